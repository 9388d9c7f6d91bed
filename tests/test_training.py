"""The trainer: learning, exact resume, checkpoints, interruption and its CLI."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from charnn import TrainConfig, Trainer, train
from charnn import checkpoint as ckpt
from charnn.cli import main
from charnn.data import StreamBatcher, eval_streams, load_corpus
from charnn.errors import CharnnError
from charnn.lm import load_language_model
from charnn.model import ModelConfig, bits_per_char
from charnn.training import TrainingInterrupted, evaluate
from charnn.vocab import UNK_ID, Vocabulary


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["train_loss"] for r in ckpt.read_metrics(run_dir) if "train_loss" in r}


def tiny_config(corpus: Path, out: Path, **overrides) -> TrainConfig:
    settings = dict(corpus=[str(corpus)], preset="tiny", out=str(out), quiet=True, log_every=1, eval_every=10,
                    precision="fp32")
    settings.update(overrides)
    return TrainConfig(**settings)


# -- learning ------------------------------------------------------------------------------
def test_loss_falls_on_a_tiny_run(small_corpus, tmp_path):
    result = train(tiny_config(small_corpus, tmp_path / "run", max_steps=60))
    trace = losses(result.run_dir)
    first = np.mean([trace[s] for s in range(1, 6)])
    last = np.mean([trace[s] for s in range(56, 61)])
    assert last < first - 1.0, (first, last)
    assert result.best_val_bpc is not None and result.best_val_bpc < 5.0
    assert result.stop_reason == "max-steps" and result.steps == 60


@pytest.mark.parametrize("cell", ["gru", "rnn"])
def test_other_cells_learn(small_corpus, tmp_path, cell):
    result = train(tiny_config(small_corpus, tmp_path / cell, cell=cell, max_steps=40))
    trace = losses(result.run_dir)
    assert trace[40] < trace[1] - 0.5


def test_same_seed_same_run(small_corpus, tmp_path):
    a = train(tiny_config(small_corpus, tmp_path / "a", max_steps=15))
    b = train(tiny_config(small_corpus, tmp_path / "b", max_steps=15))
    assert losses(a.run_dir) == losses(b.run_dir)


def test_training_leaves_the_callers_random_state_alone(small_corpus, tmp_path):
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    train(tiny_config(small_corpus, tmp_path / "run", max_steps=3))  # seeds itself from cfg.seed
    assert torch.equal(torch.rand(3), expected)


# -- exact resume -------------------------------------------------------------------------------
def _interrupt_at(step: int):
    def on_log(record):
        if record.get("step") == step and "train_loss" in record:
            os.kill(os.getpid(), signal.SIGINT)  # the real signal path: finish the step, save, stop
    return on_log


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_interrupted_and_resumed_run_matches_uninterrupted(small_corpus, tmp_path, precision):
    whole = train(tiny_config(small_corpus, tmp_path / "whole", max_steps=40, dropout=0.1, precision=precision))
    cfg = tiny_config(small_corpus, tmp_path / "split", max_steps=40, dropout=0.1, precision=precision)
    with pytest.raises(TrainingInterrupted) as info:
        Trainer(cfg, on_log=_interrupt_at(17)).fit()
    assert info.value.exit_code == 128 + signal.SIGINT
    assert max(losses(tmp_path / "split")) == 17
    resumed = Trainer.resume(tmp_path / "split").fit()
    assert resumed.steps == 40
    assert losses(tmp_path / "split") == losses(whole.run_dir)
    vals = lambda d: [r["val_bpc"] for r in ckpt.read_metrics(d) if "val_bpc" in r]  # noqa: E731
    assert vals(tmp_path / "split") == vals(whole.run_dir)


def test_resume_inside_the_averaging_window_is_exact(small_corpus, tmp_path):
    whole = train(tiny_config(small_corpus, tmp_path / "whole", max_steps=40))
    with pytest.raises(TrainingInterrupted):
        Trainer(tiny_config(small_corpus, tmp_path / "split", max_steps=40), on_log=_interrupt_at(35)).fit()
    Trainer.resume(tmp_path / "split").fit()
    records = [r for r in ckpt.read_metrics(whole.run_dir) if "val_bpc" in r]
    assert [r.get("averaged_steps") for r in records][-2:] == [None, 9]  # steps 32..40 are averaged
    vals = lambda d: [r["val_bpc"] for r in ckpt.read_metrics(d) if "val_bpc" in r]  # noqa: E731
    assert vals(tmp_path / "split") == vals(whole.run_dir)
    a = load_file(str(whole.run_dir / "best" / "model.safetensors"))
    b = load_file(str(tmp_path / "split" / "best" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    model, ck = load_language_model(whole.run_dir, device="cpu")  # the averaged weights are what was scored
    corpus = load_corpus([str(small_corpus)], vocab=ck.vocab, progress=False)
    nats, _ = evaluate(model, corpus.val, seq_len=128)
    assert bits_per_char(nats) == pytest.approx(records[-1]["val_bpc"], abs=1e-5)


def test_weight_average_is_the_mean_of_the_weights_it_saw():
    from charnn.averaging import WeightAverage

    model = torch.nn.Linear(3, 2)
    average = WeightAverage(model)
    seen = []
    for k in range(4):
        with torch.no_grad():
            model.weight.fill_(float(k))
        seen.append(model.weight.detach().clone())
        average.update()
    raw = model.weight.detach().clone()
    with average.applied():
        torch.testing.assert_close(model.weight.detach(), torch.stack(seen).mean(0))
    assert torch.equal(model.weight.detach(), raw)  # swapped back


def test_resume_across_epoch_boundary_with_time_extension(small_corpus, tmp_path):
    cfg = tiny_config(small_corpus, tmp_path / "run", max_steps=10, batch_size=16, seq_len=64)
    first = train(cfg)
    again = Trainer.resume(first.run_dir, {"max_steps": 20}).fit()
    assert again.steps == 20 and sorted(losses(first.run_dir)) == list(range(1, 21))
    last_eval = [r for r in ckpt.read_metrics(first.run_dir) if "val_bpc" in r][-1]
    assert last_eval["averaged_steps"] == 5  # the new budget's last fifth (steps 16-20), not the old one's


# -- checkpoints ---------------------------------------------------------------------------------
def test_checkpoint_round_trip_gives_identical_logits(small_corpus, tmp_path):
    trainer = Trainer(tiny_config(small_corpus, tmp_path / "run", max_steps=12, tie_weights=True, embed_dim=128))
    trainer.fit()
    trainer.save("best")
    model, ck = load_language_model(trainer.run_dir, device="cpu")
    ids = torch.from_numpy(trainer.corpus.val[:200].astype(np.int64))[None]
    trainer.model.eval()
    with torch.no_grad(), trainer.average.applied():  # the best model is the averaged one
        expected, _ = trainer.model(ids)
        got, _ = model(ids)
    assert torch.equal(expected, got)
    assert ck.vocab == trainer.corpus.vocab
    assert model.head.weight.data_ptr() == model.embed.weight.data_ptr()  # still tied after loading


def test_checkpoint_files_and_no_pickle(tiny_run):
    for name in ("best", "last"):
        files = sorted(p.name for p in (tiny_run / name).iterdir())
        assert {"model.safetensors", "config.json", "vocab.json"} <= set(files)
    assert {"train_state.json", "train_state.safetensors"} <= {p.name for p in (tiny_run / "last").iterdir()}
    config = json.loads((tiny_run / "best" / "config.json").read_text())
    assert config["format"] == "charnn-checkpoint" and config["kind"] == "language-model"
    assert not list(tiny_run.rglob("*.pt")) and not list(tiny_run.rglob("*.pkl"))
    for name in ("best/model.safetensors", "last/model.safetensors", "last/train_state.safetensors"):
        # readable by whoever may read the config (safetensors alone writes its files 0600, whatever the umask)
        assert (tiny_run / name).stat().st_mode & 0o777 == (tiny_run / "best" / "config.json").stat().st_mode & 0o777


def test_crash_while_saving_keeps_the_previous_checkpoint(tiny_run, tmp_path, monkeypatch):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(tiny_run, run)
    model, ck = load_language_model(run, which="last")
    before = (run / "last" / "model.safetensors").read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "_write_json", crash)
    with pytest.raises(OSError):
        ckpt.save_checkpoint(run / "last", model=model, vocab=ck.vocab, config={})
    assert (run / "last" / "model.safetensors").read_bytes() == before
    assert [p.name for p in run.iterdir() if p.name.startswith(".")] == []
    load_language_model(run, which="last")


def test_fine_tune_from_a_trained_model(tiny_run, small_corpus, tmp_path):
    source, _ = load_language_model(tiny_run)
    trainer = Trainer(tiny_config(small_corpus, tmp_path / "ft", max_steps=1, init_from=str(tiny_run), lr=1e-12,
                                  warmup_steps=0))
    assert trainer.model_config == source.config
    for (name, a), (_, b) in zip(source.state_dict().items(), trainer.model.state_dict().items()):
        assert torch.equal(a, b), name


# -- data and vocabulary ------------------------------------------------------------------------------
def test_vocabulary_maps_rare_and_unseen_characters_to_unknown():
    vocab = Vocabulary.from_text("aaabbc", min_count=2)
    assert vocab.chars[1:] == ["a", "b"]
    assert list(vocab.encode("abcz")) == [1, 2, UNK_ID, UNK_ID]
    assert Vocabulary.from_dict(json.loads(vocab.to_json())) == vocab


def test_batches_are_contiguous_streams():
    data = np.arange(10_000, dtype=np.int64) % 251
    batcher = StreamBatcher(data.astype(np.uint8), batch_size=4, seq_len=10)
    batches = list(batcher.batches(offset=3))
    assert len(batches) == batcher.steps_per_epoch
    (x0, y0), (x1, _) = batches[0], batches[1]
    assert torch.equal(y0[:, :-1], x0[:, 1:])
    assert torch.equal(x1[:, 0], y0[:, -1])  # the next chunk continues each stream
    assert int(x0[0, 0]) == 3


def test_evaluation_streams_cover_every_target_once():
    data = np.arange(1, 1001, dtype=np.int64)
    seen = []
    for x, y, mask in eval_streams(data, n_streams=7, seq_len=16):
        seen.extend(y[mask].tolist())
    assert sorted(seen) == list(range(2, 1001))


def test_evaluation_uses_few_long_streams_by_default():
    from charnn.data import EVAL_STREAM_CHARS, MAX_EVAL_STREAMS, eval_stream_count

    assert eval_stream_count(100) == 1
    assert eval_stream_count(111_539) == 111_539 // EVAL_STREAM_CHARS == 6
    assert eval_stream_count(10**9) == MAX_EVAL_STREAMS
    data = np.arange(1, 50_001, dtype=np.int64)
    x, _, _ = next(eval_streams(data, n_streams=None, seq_len=16))
    assert x.shape[0] == eval_stream_count(len(data) - 1)


# -- the command line ------------------------------------------------------------------------------
def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.parametrize("encoding, given", [("utf-16", "utf-8"), ("utf-16-be", "utf-8"), ("utf-32", "utf-8"),
                                             ("utf-16-le", "utf-16-le"), ("utf-8-sig", "utf-8-sig")])
def test_byte_order_marks_are_read_not_learned(tmp_path, monkeypatch, encoding, given):
    """A UTF-16 file (as PowerShell writes) read with the default utf-8 was refused as 'binary'; with an explicit
    utf-16-le its byte-order mark became a character of the vocabulary."""
    text = "héllo wörld\n" * 300
    bom = {"utf-16-be": "\ufeff", "utf-16-le": "\ufeff"}.get(encoding, "")
    path = tmp_path / "windows.txt"
    path.write_bytes((bom + text).encode(encoding))
    monkeypatch.setenv("CHARNN_CACHE", str(tmp_path / "cache"))
    for threshold in (10**9, 0):  # in memory, streamed
        corpus = load_corpus([path], encoding=given, stream_threshold=threshold, progress=False)
        assert corpus.vocab.decode(np.concatenate([corpus.train, corpus.val])) == text


def test_windows_and_old_mac_line_endings_read_as_newlines(tmp_path, monkeypatch):
    """CRLF files left '\\r' in the vocabulary: the model spent capacity predicting it after every line, sampled
    CRLF, and scored LF text (or LF-trained models CRLF text) with an unknown character per line."""
    from charnn import tokenstore

    lines = ["première ligne", "second line", "", "third"] * 40
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_bytes("\r\n".join(lines).encode() + b"\r\n")
    (folder / "b.txt").write_bytes("\r".join(lines).encode() + b"\r")
    expected = ("\n".join(lines) + "\n") * 2
    for chunk in (7, 8, 1 << 20):  # CR and LF in different chunks
        monkeypatch.setattr(tokenstore, "CHUNK_BYTES", chunk)
        monkeypatch.setenv("CHARNN_CACHE", str(tmp_path / f"cache{chunk}"))
        for threshold in (10**9, 0):  # in memory, streamed
            corpus = load_corpus([folder], stream_threshold=threshold, progress=False)
            assert corpus.vocab.decode(np.concatenate([corpus.train, corpus.val])) == expected
            assert "\r" not in corpus.vocab


def test_a_file_given_twice_is_read_once(tmp_path):
    """A file named twice, or also inside a folder given (or linked there), was read twice: the copy landed in the
    validation text, which then scored the training text itself."""
    folder = tmp_path / "notes"
    folder.mkdir()
    text = "some notes to learn from\n" * 50
    (folder / "a.txt").write_text(text, encoding="utf-8")
    (folder / "link.txt").symlink_to(folder / "a.txt")
    for paths in ([folder / "a.txt", folder / "a.txt"], [folder, folder / "a.txt"], [folder, str(folder) + "/"]):
        assert load_corpus(paths).n_chars == len(text)


def test_an_unreadable_folder_in_a_corpus_is_an_error(tmp_path, monkeypatch):
    """The glob skipped a subfolder it could not list (no read permission), so its files were silently left out; an
    unreadable folder given itself had 'no files matching'."""
    for folder in ("corpus", "corpus/locked", "corpus/.hidden"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "a.txt").write_text("text\n", encoding="utf-8")
    real_scandir = os.scandir

    def scandir(path="."):
        if Path(path).name in ("locked", ".hidden"):  # as chmod 000 does (for all but root)
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    for paths, glob in (([tmp_path / "corpus"], "**/*"), ([tmp_path / "corpus"], "**/*.txt"),
                        ([tmp_path / "corpus/locked"], "*.txt")):
        with pytest.raises(CharnnError, match=r"^cannot list folder .*locked \(Permission denied\), so its files would"):
            load_corpus(paths, glob=glob)
    assert load_corpus([tmp_path / "corpus"], glob="*.txt").n_chars == 5  # the glob never enters locked/


def test_a_broken_symbolic_link_is_named_as_one(tmp_path):
    """A link to a missing file, or to itself, was reported as 'no such file or directory' though it is there."""
    (tmp_path / "loop.txt").symlink_to(tmp_path / "loop.txt")
    (tmp_path / "dangling.txt").symlink_to(tmp_path / "moved.txt")
    for name, target in (("loop.txt", "loop.txt"), ("dangling.txt", "moved.txt")):
        with pytest.raises(CharnnError, match=rf"{name} is a symbolic link to .*{target}, which is missing or loops"):
            load_corpus([tmp_path / name])


def assert_clear_error(result, fragment):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert fragment in lines[0]
    assert "Traceback" not in result.output


def test_bad_inputs_give_one_line_errors(tmp_path, small_corpus):
    binary = tmp_path / "image.bin"
    binary.write_bytes(b"\x89PNG\x00\x00\x01\x02" * 50)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("café au lait ".encode("latin-1") * 100)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    short = tmp_path / "short.txt"
    short.write_text("just a few words\n" * 3)
    cases = [
        ((tmp_path / "missing.txt",), "no such file"),
        ((binary,), "binary"),
        ((latin,), "--encoding"),
        ((empty,), "empty"),
        ((short,), "too short"),
        ((small_corpus, "--val-fraction", "1.5"), "--val-fraction"),
        ((small_corpus, "--time", "ten minutes"), "--time"),
        ((small_corpus, "--lr", "-1"), "--lr"),
        ((tmp_path,), "no files matching"),
    ]
    for args, fragment in cases:
        if args == (tmp_path,):
            (tmp_path / "sub").mkdir(exist_ok=True)
            args = (tmp_path / "sub",)
        assert_clear_error(run_cli("train", *args, "--preset", "tiny", "--out", tmp_path / "never"), fragment)
    assert not (tmp_path / "never").exists()


def test_refuses_to_overwrite_an_existing_run(tiny_run):
    before = (tiny_run / "best" / "model.safetensors").read_bytes()
    result = run_cli("train", "whatever.txt", "--out", tiny_run)
    assert result.exit_code == 2
    result = run_cli("train", tiny_run / "best" / "vocab.json", "--out", tiny_run)
    assert_clear_error(result, "--resume")
    assert (tiny_run / "best" / "model.safetensors").read_bytes() == before


def test_corrupt_or_partial_checkpoints_are_clear_errors(tiny_run, tmp_path, small_corpus):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_run, broken)
    (broken / "best" / "model.safetensors").write_bytes(b"not really weights")
    assert_clear_error(run_cli("eval", broken, small_corpus), "damaged")
    partial = tmp_path / "partial"
    shutil.copytree(tiny_run, partial)
    (partial / "best" / "vocab.json").unlink()
    assert_clear_error(run_cli("eval", partial, small_corpus), "vocab.json")
    resized = tmp_path / "resized"
    shutil.copytree(tiny_run, resized)
    config = json.loads((resized / "best" / "config.json").read_text())
    config["model"]["hidden"] += 8
    (resized / "best" / "config.json").write_text(json.dumps(config))
    assert_clear_error(run_cli("eval", resized, small_corpus), "does not match its config (size mismatch for")
    assert_clear_error(run_cli("eval", tmp_path / "nowhere", small_corpus), "not found")
    assert_clear_error(run_cli("train", "--resume", tmp_path / "nowhere"), "not found")


def test_eval_and_info_json(tiny_run, small_corpus):
    result = run_cli("eval", tiny_run, small_corpus, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert 0 < report["bpc"] < 8 and report["scored_chars"] == report["chars"] - 1
    result = run_cli("info", tiny_run, "--json")
    info = json.loads(result.output)
    assert info["model"]["hidden"] == 128 and info["vocabulary"]["size"] > 50
    assert info["history"]["evaluations"]


def test_eval_of_a_folder_skips_hidden_folders(tiny_run, tmp_path):
    folder = tmp_path / "project"
    (folder / ".git").mkdir(parents=True)
    (folder / ".git" / "index").write_bytes(b"DIRC\x00\x00\x00\x02" * 8)  # what git keeps there: binary
    (folder / ".git" / "HEAD").write_text("ref: refs/heads/main\n", encoding="utf-8")
    (folder / "notes.txt").write_text("The interpreter reads a line.\n", encoding="utf-8")
    result = run_cli("eval", tiny_run, folder, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["chars"] == len("The interpreter reads a line.\n")


def test_eval_json_interrupted_prints_one_json_object(tiny_run, small_corpus, monkeypatch):
    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("charnn.training.evaluate", ctrl_c)
    result = run_cli("eval", tiny_run, small_corpus, "--json")
    assert result.exit_code == 130, result.output
    assert json.loads(result.stdout) == {"interrupted": True, "checkpoint": str(tiny_run), "files": [str(small_corpus)]}
    assert "interrupted" in result.stderr and "Traceback" not in result.output and "Aborted" not in result.output


def test_info_and_plot_skip_damaged_metrics_lines(tiny_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    good = (run / "metrics.jsonl").read_bytes()
    hand_edited = b'{"step": "ten", "val_bpc": 1.5}\n{"step": 10, "val_bpc": "1.5"}\n{"step": 10, "val_bpc": true}\n'
    (run / "metrics.jsonl").write_bytes(b"5\n[1, 2]\n\xff\xfe garbage\n" + hand_edited + good)  # hand-edited or damaged
    info = run_cli("info", run, "--json")
    assert info.exit_code == 0, info.output
    assert json.loads(info.stdout)["history"]["records"] == len(good.splitlines())
    assert run_cli("info", run).exit_code == 0
    last = json.loads(good.splitlines()[-1])["step"]
    ckpt.truncate_metrics(run, last)  # what a resume does: it reads every record's step
    assert (run / "metrics.jsonl").read_bytes() == good
    if importlib.util.find_spec("matplotlib"):
        assert run_cli("plot", run, "-o", tmp_path / "curves.png").exit_code == 0
    (run / "metrics.jsonl").unlink()
    (run / "metrics.jsonl").mkdir()
    assert_clear_error(run_cli("info", run, "--json"), "metrics.jsonl (Is a directory); move it aside")


def test_info_of_a_checkpoint_without_a_summary(tiny_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    config = json.loads((run / "best" / "config.json").read_text())
    del config["summary"]  # e.g. written by another program: the section info falls back on is optional
    (run / "best" / "config.json").write_text(json.dumps(config))
    result = run_cli("info", run)
    assert result.exit_code == 0, result.output
    assert ", ? parameters" in result.output


def test_plot_writes_a_png(tiny_run, tmp_path):
    pytest.importorskip("matplotlib", reason="the plot extra (matplotlib) is not installed")
    out = tmp_path / "curves.png"
    result = run_cli("plot", tiny_run, "-o", out)
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- the real console script ------------------------------------------------------------------------------
def console(*args, **kwargs):
    exe = Path(sys.executable).with_name("charnn")
    cmd = [str(exe) if exe.exists() else "charnn", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kwargs)


def test_console_script_end_to_end(tmp_path):
    corpus = tmp_path / "docs.txt"
    built = console("corpus", "build", "python-docs", "-o", corpus, "--max-chars", "80000")
    assert built.returncode == 0, built.stderr
    trained = console("train", corpus, "--preset", "tiny", "--max-steps", "30", "--out", tmp_path / "run")
    assert trained.returncode == 0, trained.stderr
    assert "parameters" in trained.stderr and "best val bpc" in trained.stderr
    info = console("info", tmp_path / "run", "--json")
    assert json.loads(info.stdout)["summary"]["step"] == 30


def test_sigint_leaves_a_resumable_checkpoint(small_corpus, tmp_path):
    run = tmp_path / "run"
    exe = Path(sys.executable).with_name("charnn")
    proc = subprocess.Popen([str(exe), "train", str(small_corpus), "--preset", "tiny", "--max-steps", "100000",
                             "--out", str(run), "--log-every", "1", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(ckpt.read_metrics(run)) < 5:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert f"charnn train --resume {run}" in err
    report = json.loads(out)  # --json: one object on stdout, for scripts
    assert report["interrupted"] and report["checkpoint"] == str(run / "last") and report["resume"].endswith(str(run))
    ck = ckpt.load_checkpoint(run, which="last", with_train_state=True)
    step = ck.train_state["step"]
    assert step >= 5
    resumed = console("train", "--resume", run, "--max-steps", step + 3, "-q")
    assert resumed.returncode == 0, resumed.stderr
    assert ckpt.load_checkpoint(run, which="last", with_train_state=True).train_state["step"] == step + 3


def test_defaults_follow_device_and_budget():
    from charnn.presets import PRESETS, recommend

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert recommend(cpu, None, None)["hidden"] == PRESETS["small"]["hidden"]  # no budget: the quick model
    assert recommend(cpu, None, None)["max_epochs"] > 0  # ... with an epoch limit, so it ends
    assert recommend(cpu, 3 * 60, None)["hidden"] == PRESETS["small"]["hidden"]
    assert recommend(cpu, 10 * 60, None)["hidden"] == PRESETS["medium"]["hidden"]
    assert recommend(cuda, 2 * 3600, None)["hidden"] == PRESETS["large"]["hidden"]
    assert recommend(cpu, 10 * 60, "tiny")["hidden"] == PRESETS["tiny"]["hidden"]  # a preset wins
    with pytest.raises(CharnnError, match="^preset must be one of"):
        recommend(cpu, None, "huge")


def test_threads_option_sets_torch_threads(tiny_run):
    before = torch.get_num_threads()
    try:
        result = run_cli("--threads", 2, "info", tiny_run, "--json")
        assert result.exit_code == 0, result.output
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert_clear_error(run_cli("--threads", 0, "info", tiny_run), "--threads must be a whole number between 1 and 1024, got '0'")
    for value in ("abc", "0", "-2"):  # the environment variable is named as the source of the mistake, not --threads
        result = CliRunner().invoke(main, ["info", str(tiny_run)], env={"CHARNN_THREADS": value})
        assert_clear_error(result, f"CHARNN_THREADS must be a whole number between 1 and 1024, got '{value}'")


def test_train_json_prints_one_object(small_corpus, tmp_path):
    result = CliRunner().invoke(main, ["train", str(small_corpus), "--preset", "tiny", "--max-steps", "6",
                                       "--eval-every", "3", "--out", str(tmp_path / "run"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["steps"] == 6 and report["stop_reason"] == "max-steps"
    assert report["run_dir"] == str(tmp_path / "run") and report["best_val_bpc"] > 0


# -- checkpoint safety, and classifier runs met by the shared commands --------------------------------------------
@pytest.fixture(scope="module")
def clf_runs(tmp_path_factory):
    """A classifier run and a two-member ensemble run, trained in seconds through the CLI; and their data."""
    import random

    rng = random.Random(0)
    rows = ["text\tlabel"]
    for _ in range(100):
        body = "".join(rng.choice("abc") for _ in range(rng.randint(3, 8)))
        rows += [f"x{body}y\txy", f"y{body}x\tyx"]
    root = tmp_path_factory.mktemp("clf")
    data = root / "data.tsv"
    data.write_text("\n".join(rows) + "\n", encoding="utf-8")
    common = ["classify", "train", data, "--hidden", "16", "--embed-dim", "8", "--batch-size", "16", "--max-epochs",
              "2", "--device", "cpu", "-q"]
    for name, extra in (("single", []), ("ensemble", ["--ensemble", "2"])):
        result = run_cli(*common, "--out", root / name, *extra)
        assert result.exit_code == 0, result.output
    return root / "single", root / "ensemble", data


def test_saving_a_checkpoint_replaces_only_a_checkpoint(tiny_run, clf_runs, tmp_path):
    import shutil

    from charnn.classify import TextClassifier

    single, ensemble, _ = clf_runs
    clf = TextClassifier.load(single)
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "notes.txt").write_text("keep me")
    afile = tmp_path / "afile"
    afile.write_text("keep me too")
    run = tmp_path / "run"
    shutil.copytree(ensemble, run)
    run_files = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    extra = tmp_path / "extra"
    shutil.copytree(single / "best", extra)
    (extra / "README").write_text("mine")
    for target, fragment in ((folder, "already holds other files"), (afile, "is a file"), (run, "already holds other"),
                             (extra, "already holds a classifier checkpoint; pass overwrite=True")):
        with pytest.raises(CharnnError, match=fragment):
            clf.save(target)
    with pytest.raises(CharnnError, match="already holds other files"):
        clf.save(extra, overwrite=True)
    assert (folder / "notes.txt").read_text() == "keep me" and (folder / "sub").is_dir()
    assert afile.read_text() == "keep me too"
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == run_files
    assert (extra / "README").read_text() == "mine"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary copies left behind
    (tmp_path / "empty").mkdir()
    for target in (tmp_path / "empty", tmp_path / "new" / "model", tmp_path / "new" / "model"):  # the last: a rewrite
        clf.save(target, overwrite=True)
        assert TextClassifier.load(target).predict(["xaby"]).tolist() == clf.predict(["xaby"]).tolist()
    # the trainer's own rewrite of RUN/last (a checkpoint directory) still works
    copy = tmp_path / "lm"
    shutil.copytree(tiny_run, copy)
    model, ck = load_language_model(copy, which="last")
    ckpt.save_checkpoint(copy / "last", model=model, vocab=ck.vocab, config=ck.config)
    load_language_model(copy, which="last")


def test_out_that_is_a_file_or_another_run_is_a_clear_error(tiny_run, clf_runs, small_corpus, tmp_path):
    single, ensemble, data = clf_runs
    afile = tmp_path / "afile"
    afile.write_text("mine")
    assert_clear_error(run_cli("train", small_corpus, "--out", afile), f"{afile} is a file, not a run directory")
    assert_clear_error(run_cli("classify", "train", data, "--out", afile), "choose another --out")
    assert afile.read_text() == "mine"
    # the resume advice names the command that made the run in --out
    assert_clear_error(run_cli("classify", "train", data, "--out", tiny_run), f"charnn train --resume {tiny_run}")
    for run in (single, ensemble):
        assert_clear_error(run_cli("train", small_corpus, "--out", run), f"charnn classify train --resume {run}")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    result = run_cli("train", small_corpus, "--out", tmp_path / "other")
    assert_clear_error(result, "choose another --out")
    assert "--resume" not in result.output


def test_out_under_a_file_is_a_one_line_error(small_corpus, clf_runs, tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("keep me")
    data = clf_runs[2]
    for args in (("train", small_corpus), ("classify", "train", data)):
        result = run_cli(*args, "--out", blocker / "run", "--max-steps", 1)
        assert isinstance(result.exception, SystemExit)
        assert_clear_error(result, f"error: cannot create directory {blocker / 'run'} ({blocker} is a file); "
                                   "give the run directory (--out) in a folder you can write")  # before any other line
    assert blocker.read_text() == "keep me"


def test_messages_name_the_setting_as_the_caller_typed_it(small_corpus, clf_runs, tmp_path):
    """The Python API's errors name parameters (batch_size); the same mistake on the command line names flags."""
    with pytest.raises(CharnnError, match=r"^batch_size must be at least 1, got 0$"):
        train(TrainConfig(corpus=[str(small_corpus)], batch_size=0, out=str(tmp_path / "a"), quiet=True))
    assert_clear_error(run_cli("train", small_corpus, "--batch-size", 0, "--out", tmp_path / "b"),
                       "--batch-size must be at least 1, got 0")
    from charnn import TextClassifier  # noqa: PLC0415

    with pytest.raises(CharnnError, match=r"^give a budget: max_epochs, max_steps or time_budget$"):
        TextClassifier(max_epochs=None).fit(["ab", "ba"], ["x", "y"])
    assert_clear_error(run_cli("classify", "train", clf_runs[2], "--time", "0s", "--out", tmp_path / "c"),
                       "--time must be positive")
    with pytest.raises(CharnnError, match=r"^activation='relu' applies to cell='rnn' only$"):  # and after the CLI ran
        ModelConfig(vocab_size=10, activation="relu")


def test_train_resume_of_a_classifier_run_points_to_classify(clf_runs):
    single, ensemble, _ = clf_runs
    for run in (single, ensemble):
        assert_clear_error(run_cli("train", "--resume", run), f"resume it with charnn classify train --resume {run}")


def test_where_features_meet(tiny_run, clf_runs, tmp_path, monkeypatch):
    """Defects a workflow probe found where two features meet, each once silent or misleading."""
    import shutil

    from charnn.classify import TextClassifier

    single, ensemble, data = clf_runs
    # --last on an ensemble run answered with its best models; an unfinished ensemble "is not a charnn checkpoint"
    for args in (("info", ensemble, "--last"), ("classify", "predict", ensemble, "--last", "xaby")):
        assert_clear_error(run_cli(*args), "is an ensemble run: it keeps its members' best models together and no last")
    unfinished = tmp_path / "unfinished"
    shutil.copytree(ensemble / "member-1", unfinished / "member-1")
    assert_clear_error(run_cli("info", unfinished), f"is an unfinished ensemble run (it has no ensemble until every "
                                                    f"member has trained); resume it with charnn classify train --resume {unfinished}")
    # a checkpoint saved on its own: plot drew (and info counted) the parent folder's metrics, here a language model's
    TextClassifier.load(single).save(tiny_run.parent / "exported")
    assert_clear_error(run_cli("plot", tiny_run.parent / "exported"), "is a checkpoint saved on its own, without its run's")
    assert json.loads(run_cli("info", tiny_run.parent / "exported", "--json").output)["history"]["records"] == 0
    # fine-tuning a language model keeps its vocabulary: --min-char-count was accepted and recorded, and did nothing
    assert_clear_error(run_cli("train", data.parent / "data.tsv", "--init-from", tiny_run, "--min-char-count", 5,
                               "--out", tmp_path / "ft"), "--min-char-count: --init-from")
    # --ensemble 1 given with two language models trained two members anyway
    monkeypatch.chdir(tiny_run.parent)
    with pytest.raises(CharnnError, match="ensemble must be at least the number of language models"):
        TextClassifier(init_from=[tiny_run.name, tiny_run.name], ensemble=1).fit(["ab", "ba"] * 8, ["x", "y"] * 8)
    # relative --init-from paths are stored absolute, so the run resumes and is described from any folder
    clf = TextClassifier(init_from=tiny_run.name, max_steps=2, freeze_encoder=False).fit(["ab", "ba"] * 8, ["x", "y"] * 8)
    assert clf.checkpoint_config_["training"]["init_from"] == str(tiny_run)
    assert TrainConfig(corpus=["x"], init_from=tiny_run.name).init_from == str(tiny_run)


def test_missing_checkpoint_message_names_no_command(tmp_path):
    for args in (("classify", "predict", tmp_path / "nonexist", "text"), ("info", tmp_path / "nonexist")):
        result = run_cli(*args)
        assert_clear_error(result, "not found; pass a run directory or a checkpoint directory")
        assert "charnn train" not in result.output


def test_info_describes_a_classifier(clf_runs):
    single, ensemble, _ = clf_runs
    result = run_cli("info", single)
    assert result.exit_code == 0, result.output
    text = result.output
    for fragment in ("classifier: 2 classes, single-label: 'xy', 'yx'", "unidirectional, concat pooling",
                     "truncation: head (a text longer than 1,000 characters keeps its head)",
                     "language model: none", "weight decay 0.0", "validation history (step: macro-F1): "):
        assert fragment in text, text
    assert "None" not in text
    report = json.loads(run_cli("info", single, "--json").output)
    assert report["classifier"]["classes"] == ["xy", "yx"] and report["classifier"]["pooling"] == "concat"
    evaluations = report["history"]["evaluations"]
    assert evaluations and all(0 <= e["val_macro_f1"] <= 1 and "val_accuracy" in e for e in evaluations)
    text = run_cli("info", ensemble).output
    assert "epochs (all members): 4.0" in text and "steps (all members):" in text and "\nepoch:" not in text
    assert json.loads(run_cli("info", ensemble, "--json").output)["classifier"]["members"] == 2


def test_info_refuses_a_damaged_weights_file(tiny_run, tmp_path):
    import shutil

    for cut in (lambda b: b[: len(b) // 2], lambda b: b[:-1], lambda b: b + b"\0"):
        broken = tmp_path / "broken"
        shutil.rmtree(broken, ignore_errors=True)
        shutil.copytree(tiny_run, broken)
        weights = broken / "best" / "model.safetensors"
        weights.write_bytes(cut(weights.read_bytes()))
        assert_clear_error(run_cli("info", broken), "model.safetensors is damaged")
        assert_clear_error(run_cli("info", broken, "--json"), "model.safetensors is damaged")


def saved_figures(monkeypatch) -> list:
    from matplotlib.figure import Figure

    figures, savefig = [], Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: (figures.append(self), savefig(self, *a, **k))[1])
    return figures


def test_plot_of_a_classifier_shows_its_loss_in_nats_and_its_macro_f1(clf_runs, tiny_run, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib", reason="the plot extra (matplotlib) is not installed")
    figures = saved_figures(monkeypatch)
    single, ensemble, _ = clf_runs
    for run, lines in ((single, 1), (ensemble, 2)):
        out = tmp_path / f"{run.name}.png"
        result = run_cli("plot", run, "-o", out)
        assert result.exit_code == 0, result.output
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        labels = {ax.get_ylabel(): len(ax.get_lines()) for ax in figures[-1].axes}
        assert labels == {"training loss (cross-entropy, nats)": lines, "validation macro-F1": lines}, labels
    assert run_cli("plot", tiny_run, "-o", tmp_path / "lm.png").exit_code == 0
    assert [ax.get_ylabel() for ax in figures[-1].axes] == ["bits per character"]


def test_usage_errors_are_one_line_like_the_others(tiny_run):
    assert_clear_error(run_cli("train", "--bogus"), "no such option '--bogus'")
    assert_clear_error(run_cli("train", "x.txt", "--cell", "cnn"), "invalid value for '--cell'")
    assert_clear_error(run_cli("classify", "predict"), "missing argument 'CHECKPOINT'")
    assert_clear_error(run_cli("info", tiny_run, "extra"), "info --help')")  # CliRunner names the program main


# -- divergence, fine-tuning and resuming refuse what they would get wrong ---------------------------------------
def test_a_diverged_run_keeps_only_finite_checkpoints(small_corpus, tmp_path, blow_up):
    blow_up(Trainer, "model", lambda trainer: trainer.step + 1 >= 15)  # from step 15 on
    result = train(tiny_config(small_corpus, tmp_path / "run", max_steps=40))
    assert result.stop_reason == "diverged" and result.steps == 15
    for which in ("best", "last"):
        model, ck = load_language_model(tmp_path / "run", which=which)
        assert all(torch.isfinite(p).all() for p in model.parameters()), which
        assert ck.config["summary"]["step"] == 10  # the evaluation before the blow-up
    text = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert "NaN" not in text and '"diverged": true' in text  # valid JSON lines


def test_info_and_plot_describe_a_diverged_run(small_corpus, tmp_path, blow_up, monkeypatch):
    validate = Trainer.validate
    monkeypatch.setattr(Trainer, "validate", lambda self: validate(self) if self.step < 20 else float("nan"))
    assert train(tiny_config(small_corpus, tmp_path / "val", max_steps=40)).stop_reason == "diverged"  # val_bpc null
    blow_up(Trainer, "model", lambda trainer: trainer.step + 1 >= 15)
    assert train(tiny_config(small_corpus, tmp_path / "loss", max_steps=40)).stop_reason == "diverged"  # train_loss null
    for run in (tmp_path / "val", tmp_path / "loss"):
        assert "null" in (run / "metrics.jsonl").read_text()
        info = run_cli("info", run)
        assert info.exit_code == 0, info.output
        assert "validation history (step: bpc): 10: " in info.output
        if importlib.util.find_spec("matplotlib"):
            plotted = run_cli("plot", run, "-o", tmp_path / f"{run.name}.png")
            assert plotted.exit_code == 0, plotted.output
    assert run_cli("info", tmp_path / "val").output.splitlines()[-1].endswith(", 20: not finite")


def test_a_run_that_diverges_before_saving_leaves_nothing(small_corpus, tmp_path, blow_up):
    blow_up(Trainer, "model", lambda trainer: trainer.step + 1 >= 3)  # from step 3 on
    out = run_cli("train", small_corpus, "--preset", "tiny", "--max-steps", "40", "--out", tmp_path / "run", "--quiet")
    assert_clear_error(out, "training diverged (loss is not finite) at step 3")
    assert "nothing was saved" in out.output and not (tmp_path / "run").exists()


def test_non_finite_settings_are_refused(small_corpus, tmp_path):
    cases = [("--lr", "inf", "--lr must be a positive number"), ("--forget-bias", "nan", "--forget-bias must be finite"),
             ("--log-every", "0", "--log-every must be at least 1"), ("--momentum", "-1", "--momentum must be in [0, 1)"),
             ("--grad-accum", "0", "--grad-accum must be at least 1"), ("--warmup-steps", "-1", "--warmup-steps must be 0")]
    for option, value, fragment in cases:
        out = run_cli("train", small_corpus, "--preset", "tiny", option, value, "--out", tmp_path / "never")
        assert_clear_error(out, fragment.replace("must be finite", "must be a finite number"))
    assert not (tmp_path / "never").exists()


def test_fine_tuning_refuses_architecture_options_and_records_what_it_used(tiny_run, small_corpus, tmp_path):
    source, _ = load_language_model(tiny_run)
    out = run_cli("train", small_corpus, "--init-from", tiny_run, "--cell", "gru", "--hidden", "8", "--out", tmp_path / "x")
    assert_clear_error(out, "--cell, --hidden: --init-from")
    assert not (tmp_path / "x").exists()
    trainer = Trainer(tiny_config(small_corpus, tmp_path / "ft", max_steps=2, init_from=str(tiny_run), dropout=0.3))
    assert trainer.model_config.dropout == 0.3 and trainer.model_config.hidden == source.config.hidden
    assert trainer.cfg.hidden == source.config.hidden and trainer.cfg.cell == source.config.cell  # not the preset's


def test_resume_refuses_new_settings_and_a_spent_budget(small_corpus, tmp_path):
    run = tmp_path / "run"
    train(tiny_config(small_corpus, run, max_steps=12))
    before = (run / "best" / "model.safetensors").read_bytes()
    assert_clear_error(run_cli("train", "--resume", run, "--hidden", "8"), "--hidden: a resumed run keeps its own settings")
    assert_clear_error(run_cli("train", "--resume", run), "has trained 12 steps (")
    assert_clear_error(run_cli("train", "--resume", run), "already as much as the --max-steps budget allows; give a larger --max-steps")
    assert_clear_error(run_cli("train", "--resume", run, "--max-steps", 5), "has trained 12 steps")  # a lower new budget
    assert (run / "best" / "model.safetensors").read_bytes() == before
    assert Trainer.resume(run).fit().steps == 12  # the API: fit() takes no step past the budget
    out = run_cli("train", "--resume", run, "--max-steps", "14", "--quiet")
    assert out.exit_code == 0, out.output


def test_eval_of_a_text_too_short_to_score_is_an_error(tiny_run, tmp_path):
    one = tmp_path / "one.txt"
    one.write_text("a", encoding="utf-8")
    assert_clear_error(run_cli("eval", tiny_run, one, "--json"), "holds 1 character(s); scoring needs at least 2")


def test_a_min_char_count_above_every_count_is_a_clear_error(small_corpus, tmp_path):
    out = run_cli("train", small_corpus, "--min-char-count", "100000000", "--out", tmp_path / "never")
    assert_clear_error(out, "no character occurs 100000000 times")


def test_fine_tuning_says_how_much_of_the_corpus_the_vocabulary_lacks(tiny_run, small_corpus, tmp_path):
    new = tmp_path / "new.txt"
    new.write_text("ÄÖÜ€" * 10 + small_corpus.read_text(encoding="utf-8"), encoding="utf-8")
    trainer = Trainer(tiny_config(new, tmp_path / "ft", max_steps=1, init_from=str(tiny_run)))
    assert "40 of them (" in trainer.describe() and "unknown to the model's vocabulary" in trainer.describe()


def test_without_validation_the_budget_promises_no_early_stopping(small_corpus, tmp_path):
    with_val = Trainer(tiny_config(small_corpus, tmp_path / "a", max_steps=1))
    without = Trainer(tiny_config(small_corpus, tmp_path / "b", max_steps=1, val_fraction=0.0))
    assert "early stopping after" in with_val.describe() and "early stopping" not in without.describe()


def test_a_non_finite_validation_loss_is_a_divergence(small_corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(Trainer, "validate", lambda self: float("nan"))
    result = train(tiny_config(small_corpus, tmp_path / "run", max_steps=30))
    assert result.stop_reason == "diverged" and result.steps == 10 and not (tmp_path / "run").exists()


def test_a_fine_tuning_config_can_be_used_again(tiny_run, small_corpus, tmp_path):
    cfg = tiny_config(small_corpus, tmp_path / "a", max_steps=1, init_from=str(tiny_run))
    Trainer(cfg)  # records the model's real architecture in cfg
    cfg.out = str(tmp_path / "b")
    assert Trainer(cfg).model_config == load_language_model(tiny_run)[0].config


def test_resume_names_the_limit_that_was_reached_and_checks_grad_accum(small_corpus, tmp_path):
    run = tmp_path / "run"
    train(tiny_config(small_corpus, run, max_steps=12))
    assert_clear_error(run_cli("train", "--resume", run, "--max-epochs", "50"), "give a larger --max-steps to train on")
    assert_clear_error(run_cli("train", "--resume", run, "--max-steps", "20", "--grad-accum", "0"),
                       "--grad-accum must be at least 1")
    out = run_cli("train", "--resume", run, "--no-tie-weights", "--max-steps", "20")
    assert_clear_error(out, "--no-tie-weights: a resumed run keeps its own settings (it takes only ")
    assert "--max-steps" in out.output and "--grad-accum" in out.output and "--json" in out.output


def test_python_callers_may_pass_one_corpus_path_and_pathlib_paths(small_corpus, tmp_path, tiny_run):
    """corpus="file.txt" is one file (it was read as a list of one-character paths: "/" walked the whole disk),
    and pathlib paths for corpus, out and init_from are stored in the run's JSON as strings (they failed to save)."""
    cfg = TrainConfig(corpus=small_corpus, preset="tiny", out=tmp_path / "one", quiet=True, max_steps=2)
    assert cfg.corpus == [str(small_corpus)] and cfg.out == str(tmp_path / "one")
    result = train(cfg)
    assert result.run_dir == tmp_path / "one" and result.run_dir.name == "one"
    saved = ckpt.load_checkpoint(result.run_dir).config["training"]
    assert saved["corpus"] == [str(small_corpus)]
    result = train(TrainConfig(corpus=[small_corpus], init_from=tiny_run, out=tmp_path / "ft", quiet=True, max_steps=2))
    assert ckpt.load_checkpoint(result.run_dir).config["training"]["init_from"] == str(tiny_run)


@pytest.mark.parametrize("settings, message", [
    ({"time_budget": "10m"}, "time_budget must be a number of seconds, got '10m'"),
    ({"batch_size": 4.0}, "batch_size must be an integer, got 4.0"),  # it left an empty run directory behind
    ({"lr": "0.01"}, "lr must be a number, got '0.01'"),
    ({"layer_norm": "no"}, "layer_norm must be True or False, got 'no'"),  # a truthy string turned it on
])
def test_settings_of_the_wrong_type_are_clear_errors(small_corpus, tmp_path, settings, message):
    with pytest.raises(CharnnError, match=message):
        train(tiny_config(small_corpus, tmp_path / "never", max_steps=2, **settings))
    assert not (tmp_path / "never").exists()


def test_resume_finds_the_data_from_any_folder(small_corpus, clf_runs, tmp_path, monkeypatch):
    """A run started on relative paths resumes from another folder: the run records them as absolute paths."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "c.txt").write_text(small_corpus.read_text(encoding="utf-8"), encoding="utf-8")
    (work / "d.tsv").write_text(Path(clf_runs[2]).read_text(encoding="utf-8"), encoding="utf-8")
    monkeypatch.chdir(work)
    assert run_cli("train", "c.txt", "--preset", "tiny", "--max-steps", 2, "--out", "lm").exit_code == 0
    assert run_cli("classify", "train", "d.tsv", "--hidden", 8, "--max-steps", 2, "--out", "clf").exit_code == 0
    monkeypatch.chdir(tmp_path)
    for args in (("train", "--resume", work / "lm", "--max-steps", 3),
                 ("classify", "train", "--resume", work / "clf", "--max-steps", 3)):
        result = run_cli(*args)
        assert result.exit_code == 0, result.output


@pytest.mark.parametrize("args, message", [
    (("train", "{corpus}", "--max-epochs", "inf"), "--max-epochs must be a positive (finite) number, got inf"),
    (("classify", "train", "{data}", "--max-epochs", "inf"), "--max-epochs must be a positive (finite) number, got inf"),
    (("train", "{corpus}", "--seed", 2**70), "--seed must be in [0, 2**63), got 1180591620717411303424"),
    (("classify", "train", "{data}", "--seed", 2**70), "--seed must be in [0, 2**63), got"),
    (("classify", "train", "{data}", "--log-every", 0), "--log-every must be at least 1, got 0"),
    (("train", "{corpus}", "--hidden", 10**20), "--hidden must be in [1, 1,048,576], got 100000000000000000000"),
    (("train", "{corpus}", "--hidden", 10**6), "does not fit in this machine's memory; lower --hidden or --layers"),
    (("--threads", 100000, "info", "{corpus}"), "--threads must be a whole number between 1 and 1024, got '100000'"),  # torch segfaulted
    (("train", "{folder}", "--glob", ""), "--glob '' is not a usable pattern"),
    (("train", "{folder}", "--glob", "/abs/*.txt"), "is not a usable pattern (Non-relative patterns are unsupported)"),
    (("classify", "train", "{data}", "--min-char-count", 10**6), "no character occurs 1000000 times in the training texts"),
    (("train", "{corpus}", "--patience", -1), "--patience must be at least 1 (0 turns early stopping off), got -1"),
])
def test_out_of_range_settings_are_one_line_errors(small_corpus, clf_runs, tmp_path, args, message):
    """Each of these was a traceback (OverflowError, ZeroDivisionError, a torch stack trace, a segfault...)."""
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.txt").write_text("some text\n" * 50)
    values = {"{corpus}": small_corpus, "{data}": clf_runs[2], "{folder}": folder}
    result = run_cli(*[values.get(a, a) for a in args], "--out", tmp_path / "run") if args[0] != "--threads" else \
        run_cli(*[values.get(a, a) for a in args])
    assert_clear_error(result, message)
    assert not (tmp_path / "run").exists()


def test_python_settings_out_of_range_are_charnn_errors(small_corpus):
    from charnn import TextClassifier  # noqa: PLC0415

    for make, message in ((lambda: TrainConfig(corpus=[123]), "corpus must be paths (str or pathlib.Path), got 123"),
                          (lambda: train(TrainConfig(corpus=[str(small_corpus)], min_lr_ratio=-1, max_steps=1)),
                           "min_lr_ratio must be in [0, 1], got -1"),
                          (lambda: TextClassifier(min_lr_ratio=2).fit(["ab", "ba"], ["x", "y"]),
                           "min_lr_ratio must be in [0, 1], got 2"),
                          (lambda: TextClassifier().fit(["ab", "ba", "aa"], [None, "x", "y"]),
                           "label 0 (counting from 0) is None; give every text a label"),
                          (lambda: TextClassifier(patience=0).fit(["ab", "ba"], ["x", "y"]),
                           "patience must be at least 1 (None turns early stopping off), got 0")):
        with pytest.raises(CharnnError) as e:
            make()
        assert str(e.value) == message


@pytest.mark.parametrize("where", ["metrics", "weights"])
def test_a_full_or_read_only_disk_is_a_one_line_error_that_frees_the_out(small_corpus, tmp_path, monkeypatch, where):
    """A disk that refuses the run's files (full, read-only) was an OSError or SafetensorError traceback, and the
    empty run folder it left made a retry with the same --out fail."""
    from safetensors import SafetensorError

    def refuse(*args, **kwargs):
        if where == "metrics":
            raise OSError(30, "Read-only file system")
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, message: \"No space left on device\" })")

    monkeypatch.setattr(ckpt, "append_metrics" if where == "metrics" else "save_model", refuse)
    result = run_cli("train", small_corpus, "-q", "--preset", "tiny", "--max-steps", 2, "--out", tmp_path / "run")
    assert_clear_error(result, f"cannot write the run in {tmp_path / 'run'} (")
    assert "free some space or choose another --out" in result.output and not (tmp_path / "run").exists()


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux's /dev/full (a device that is always full)")
def test_a_full_stdout_is_a_one_line_error(tiny_run):
    """charnn info --json > /dev/full was an OSError traceback."""
    with open("/dev/full", "w") as full:
        result = subprocess.run([sys.executable, "-m", "charnn", "info", str(tiny_run), "--json"], stdout=full,
                                stderr=subprocess.PIPE, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr == ("error: cannot write the output (No space left on device); free some space or write "
                             "somewhere else\n")


def test_resume_refuses_a_corpus_that_changed(small_corpus, tmp_path):
    """--resume continued silently on a corpus file that had been replaced since the run started."""
    corpus = tmp_path / "c.txt"
    corpus.write_text(small_corpus.read_text(encoding="utf-8"), encoding="utf-8")
    assert run_cli("train", corpus, "-q", "--preset", "tiny", "--max-steps", 2, "--out", tmp_path / "run").exit_code == 0
    assert run_cli("train", "--resume", tmp_path / "run", "-q", "--max-steps", 3).exit_code == 0  # unchanged: fine
    corpus.write_text(small_corpus.read_text(encoding="utf-8").replace("the", "teh"), encoding="utf-8")
    assert_clear_error(run_cli("train", "--resume", tmp_path / "run", "-q", "--max-steps", 4),
                       f"the corpus changed since {tmp_path / 'run'} started")


def test_resume_from_a_damaged_training_state_is_a_clear_error(tiny_run, clf_runs, tmp_path):
    """A hand-edited train_state.json was a KeyError traceback."""
    import shutil

    for kind, run in (("train", tiny_run), ("classify", clf_runs[0])):
        copy = tmp_path / kind
        shutil.copytree(run, copy)
        (copy / "last" / "train_state.json").write_text('{"step": "x"}')
        args = ("train", "--resume", copy) if kind == "train" else ("classify", "train", "--resume", copy)
        assert_clear_error(run_cli(*args, "-q", "--max-steps", 100),
                           f"{copy / 'last' / 'train_state.json'} is damaged (KeyError: ")


def _damaged_copy(run: Path, dest: Path, damage) -> Path:
    """A copy of ``run`` with ``damage(copy)`` applied."""
    import shutil

    shutil.copytree(run, dest)
    damage(dest)
    return dest


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    edit(data)
    path.write_text(json.dumps(data), encoding="utf-8")


def _edit_tensors(path: Path, edit) -> None:
    from safetensors.torch import save_file

    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def test_damaged_checkpoint_files_are_one_line_errors_naming_the_file(tiny_run, small_corpus, tmp_path):
    """A mistyped format_version or model section was a TypeError/KeyError traceback from every command (train
    --resume and --init-from for the model section); NaN weights sampled and scored silently; a damaged vocabulary
    did not name its file."""
    def on_both(edit):
        return lambda run: [edit(run / which) for which in ("best", "last")]

    def nan_weights(checkpoint):
        _edit_tensors(checkpoint / "model.safetensors", lambda t: t["embed.weight"].fill_(float("nan")))

    cases = {
        "version": (on_both(lambda c: _edit_json(c / "config.json", lambda d: d.update(format_version="1"))),
                    "config.json is damaged (format_version '1' is not a version number)"),
        "model": (on_both(lambda c: _edit_json(c / "config.json", lambda d: d.pop("model"))),
                  "config.json is damaged (model settings: 'model')"),
        "hidden": (on_both(lambda c: _edit_json(c / "config.json", lambda d: d["model"].update(hidden="wide"))),
                   "config.json is damaged (model settings: "),
        "vocab": (on_both(lambda c: (c / "vocab.json").write_text('{"chars": 5}')),
                  "vocab.json is damaged ('int' object is not iterable)"),
        "nan": (on_both(nan_weights), "model.safetensors holds weights that are not finite"),
    }
    for name, (damage, fragment) in cases.items():
        run = _damaged_copy(tiny_run, tmp_path / name, damage)
        for args in (("eval", run, small_corpus), ("sample", run, "--length", 5),
                     ("train", "--resume", run, "-q", "--max-steps", 60),
                     ("train", small_corpus, "--init-from", run, "-q", "--max-steps", 2, "--out", tmp_path / "ft")):
            assert_clear_error(run_cli(*args), fragment)
        assert not (tmp_path / "ft").exists()
    with pytest.raises(CharnnError, match="holds weights that are not finite"):
        charnn_load(tmp_path / "nan")


def charnn_load(path):
    import charnn

    return charnn.load(path)


def test_resume_from_a_damaged_training_state_names_the_damaged_file(tiny_run, clf_runs, tmp_path):
    """Mistyped counters in train_state.json, and a missing or misshapen tensor in train_state.safetensors, were
    tracebacks (or blamed train_state.json) when a run resumed; a damaged training section of config.json too."""
    def in_last(filename, edit):
        return lambda run: (_edit_json if filename.endswith(".json") else _edit_tensors)(run / "last" / filename, edit)

    def misshape(prefix):
        return lambda t: t.update({k: torch.zeros(3, 3) for k in list(t) if k.startswith(prefix)})

    cases = {
        "counter": (in_last("train_state.json", lambda d: d.update(epoch="a")),
                    "last/train_state.json is damaged (ValueError: epoch is 'a', not a count)"),
        "negative": (in_last("train_state.json", lambda d: d.update(step=-5)), "step is -5, not a count"),
        "offset": (in_last("train_state.json", lambda d: d.update(offset=10**9)), "train_state.json is damaged"),
        "rng": (in_last("train_state.safetensors", lambda t: t.pop("rng.offsets")),
                "last/train_state.safetensors is damaged (no tensor 'rng.offsets')"),
        "optimizer": (in_last("train_state.safetensors", misshape("optim.")),
                      "train_state.safetensors is damaged (tensor 'optim."),
        "hidden": (in_last("train_state.safetensors", misshape("hidden.")),
                   "train_state.safetensors is damaged (tensor 'hidden."),
        "average": (in_last("train_state.safetensors", misshape("average.")),
                    "train_state.safetensors is damaged (tensor 'average."),
        "settings": (in_last("config.json", lambda d: d["training"].update(lr="fast")),
                     "last/config.json is damaged (training settings: lr must be a number, got 'fast')"),
    }
    for name, (damage, fragment) in cases.items():
        run = _damaged_copy(tiny_run, tmp_path / name, damage)
        if name == "average":
            _edit_json(run / "last" / "train_state.json", lambda d: d.update(averaged_steps=2))
            _edit_tensors(run / "last" / "train_state.safetensors",
                          lambda t: t.update({f"average.{i}": torch.zeros(3) for i in range(20)}))
        before = (run / "last" / "model.safetensors").read_bytes()
        assert_clear_error(run_cli("train", "--resume", run, "-q", "--max-steps", 60), fragment)
        assert (run / "last" / "model.safetensors").read_bytes() == before
    single = _damaged_copy(clf_runs[0], tmp_path / "clf", in_last("config.json", lambda d: d["training"].update(lr="fast")))
    assert_clear_error(run_cli("classify", "train", "--resume", single, "-q", "--max-steps", 100),
                       "last/config.json is damaged (training settings: lr must be a number")
    single = _damaged_copy(clf_runs[0], tmp_path / "clf-rng", in_last("train_state.safetensors", lambda t: t.pop("rng.torch")))
    assert_clear_error(run_cli("classify", "train", "--resume", single, "-q", "--max-steps", 100),
                       "last/train_state.safetensors is damaged (no tensor 'rng.torch')")


def test_resume_removes_the_half_written_checkpoint_of_a_killed_save(tiny_run, tmp_path):
    """A process killed while saving left its temporary .last.tmp-* folder in the run for good."""
    run = _damaged_copy(tiny_run, tmp_path / "run", lambda r: (r / ".last.tmp-x1y2").mkdir())
    (run / ".last.tmp-x1y2" / "model.safetensors").write_bytes(b"cut short")
    assert run_cli("train", "--resume", run, "-q", "--max-steps", 42).exit_code == 0
    assert sorted(p.name for p in run.iterdir()) == ["best", "last", "metrics.jsonl"]


def test_running_out_of_memory_while_resuming_is_not_blamed_on_the_files(tiny_run):
    """``restoring`` turns torch's errors from the saved tensors into 'damaged'; a full device is not one of them."""
    source = ckpt.load_checkpoint(tiny_run, which="last", with_train_state=True)
    with pytest.raises(torch.OutOfMemoryError):
        with ckpt.restoring(source):
            raise torch.OutOfMemoryError("CUDA out of memory")
    with pytest.raises(CharnnError, match="train_state.safetensors is damaged"):
        with ckpt.restoring(source):
            raise RuntimeError("size mismatch")
