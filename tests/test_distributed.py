"""Data-parallel training with torchrun (gloo on CPU), gradient accumulation and big corpora."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import charnn
from charnn import TrainConfig, Trainer, train
from charnn import checkpoint as ckpt
from charnn.data import load_corpus
from charnn.lm import load_language_model

TOLERANCE = 2e-4  # relative: the same sums reduced in a different order


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["train_loss"] for r in ckpt.read_metrics(run_dir) if "train_loss" in r}


def vals(run_dir: Path) -> list[float]:
    return [r["val_bpc"] for r in ckpt.read_metrics(run_dir) if "val_bpc" in r]


def settings(**extra) -> list[str]:
    base = {"--preset": "tiny", "--seq-len": 32, "--seed": 7, "--log-every": 1, "--eval-every": 4,
            "--precision": "fp32", "--dropout": 0.0}
    base.update(extra)
    return [str(a) for kv in base.items() for a in kv]


def torchrun(corpus: Path, out: Path, *args, nproc: int = 2, wait: bool = True, quiet: bool = True):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "charnn", "train", str(corpus), "--out", str(out), *(["-q"] if quiet else []), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def single(corpus: Path, out: Path, **overrides):
    cfg = dict(corpus=[str(corpus)], preset="tiny", seq_len=32, seed=7, log_every=1, eval_every=4, precision="fp32",
               dropout=0.0, out=str(out), quiet=True)
    cfg.update(overrides)
    return train(TrainConfig(**cfg))


def assert_close(a: dict[int, float], b: dict[int, float]):
    assert a.keys() == b.keys()
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=TOLERANCE), step


@pytest.fixture(scope="module")
def reference(small_corpus, tmp_path_factory):
    """One process, global batch 16 (the equivalent of 2 processes x batch 8)."""
    return single(small_corpus, tmp_path_factory.mktemp("ref") / "run", batch_size=16, max_steps=12).run_dir


def test_two_gloo_processes_match_one_process(small_corpus, tmp_path, reference):
    done = torchrun(small_corpus, tmp_path / "ddp", *settings(**{"--batch-size": 8, "--max-steps": 12}), quiet=False)
    for line in ("model: ", "done (max-steps): 12 steps", "model saved in "):  # rank 0 alone reports
        assert done.stderr.count(line) == 1, done.stderr[-3000:]
    assert_close(losses(tmp_path / "ddp"), losses(reference))
    assert vals(tmp_path / "ddp") == pytest.approx(vals(reference), rel=TOLERANCE)
    model, ck = load_language_model(tmp_path / "ddp")
    assert ck.config["summary"]["step"] == 12
    lm = charnn.load(tmp_path / "ddp")
    text = lm.generate("The ", length=40, random_seed=3)
    assert len(text) == 40 and text == lm.generate("The ", length=40, random_seed=3)


def test_gradient_accumulation_gives_the_same_global_batch(small_corpus, tmp_path, reference):
    run = single(small_corpus, tmp_path / "accum", batch_size=8, grad_accum=2, max_steps=12).run_dir
    assert_close(losses(run), losses(reference))


def test_distributed_checkpoint_resumes_on_one_process(small_corpus, tmp_path, reference):
    torchrun(small_corpus, tmp_path / "ddp", *settings(**{"--batch-size": 8, "--max-steps": 6}))
    resumed = Trainer.resume(tmp_path / "ddp", {"max_steps": 12}).fit()
    assert resumed.steps == 12
    state = ckpt.load_checkpoint(tmp_path / "ddp", which="last", with_train_state=True).train_state
    assert state["global_streams"] == 16 and state["world_size"] == 1
    assert_close(losses(tmp_path / "ddp"), losses(reference))


def test_sigterm_stops_every_rank_with_one_resumable_checkpoint(small_corpus, tmp_path):
    run = tmp_path / "ddp"
    proc = torchrun(small_corpus, run, *settings(**{"--batch-size": 8, "--max-steps": 100000}), wait=False)
    deadline = time.time() + 180
    while time.time() < deadline and len(losses(run)) < 5 and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert err.count("resume with: charnn train --resume") == 1, err[-3000:]  # rank 0 alone says it
    assert [p.name for p in run.iterdir() if p.name.startswith(".")] == []
    ck = ckpt.load_checkpoint(run, which="last", with_train_state=True)
    step = ck.train_state["step"]
    assert step >= 5 and ck.train_state["world_size"] == 2
    assert any(r.get("interrupted") == "SIGTERM" for r in ckpt.read_metrics(run))
    resumed = Trainer.resume(run, {"max_steps": step + 2}).fit()
    assert resumed.steps == step + 2


# -- corpora larger than memory ------------------------------------------------------------------------
def test_streamed_token_file_equals_in_memory_encoding(tmp_path, monkeypatch):
    from charnn import tokenstore

    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text("héllo wörld — ünïcode ✓ 😀\n" * 300 + "no final newline", encoding="utf-8-sig")  # a BOM
    (folder / "b.txt").write_text("plain ascii text\n" * 200, encoding="utf-8")
    monkeypatch.setattr(tokenstore, "CHUNK_BYTES", 7)  # chunk boundaries inside multi-byte characters
    for i, fraction in enumerate((0.1, 0.37)):
        monkeypatch.setenv("CHARNN_CACHE", str(tmp_path / f"cache{i}"))
        streamed = load_corpus([folder], val_fraction=fraction, stream_threshold=0, progress=False)
        memory = load_corpus([folder], val_fraction=fraction, stream_threshold=10**9)
        assert isinstance(streamed.train, np.memmap) and streamed.train.dtype == np.uint8
        assert streamed.vocab == memory.vocab and "\ufeff" not in memory.vocab.chars  # the BOM is not text
        assert np.array_equal(streamed.train, memory.train) and np.array_equal(streamed.val, memory.val)
        again = load_corpus([folder], val_fraction=fraction, stream_threshold=0, progress=False)
        assert again.train.filename == streamed.train.filename  # encoded once, reused
    assert len(list((tmp_path / "cache0" / "tokens").glob("*.bin"))) == 1


def test_streamed_corpus_with_a_file_name_that_is_not_utf8(tmp_path, monkeypatch):
    """A file named in Latin-1 bytes (Python's surrogate escapes) crashed the token cache with a UnicodeEncodeError."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    with open(os.fsencode(folder) + b"/caf\xe9.txt", "w", encoding="utf-8") as f:
        f.write("plain text\n" * 100)
    monkeypatch.setenv("CHARNN_CACHE", str(tmp_path / "cache"))
    for _ in range(2):  # encoded, then reused
        corpus = load_corpus([folder], stream_threshold=0, progress=False)
        assert corpus.vocab.decode(np.concatenate([corpus.train, corpus.val])) == "plain text\n" * 100


def test_large_vocabulary_uses_uint16(tmp_path, monkeypatch):
    text = "".join(chr(0x4E00 + i) for i in range(400)) * 30
    (tmp_path / "cjk.txt").write_text(text, encoding="utf-8")
    monkeypatch.setenv("CHARNN_CACHE", str(tmp_path / "cache"))
    corpus = load_corpus([tmp_path / "cjk.txt"], stream_threshold=0, progress=False)
    assert corpus.train.dtype == np.uint16 and len(corpus.vocab) == 401
    assert corpus.vocab.decode(corpus.train[:5]) == text[:5]


def test_training_reads_a_memory_mapped_corpus(small_corpus, tmp_path, monkeypatch):
    from charnn import data as data_module

    monkeypatch.setenv("CHARNN_CACHE", str(tmp_path / "cache"))
    real = data_module.load_corpus
    monkeypatch.setattr("charnn.training.load_corpus", lambda *a, **k: real(*a, **{**k, "stream_threshold": 0}))
    trainer = Trainer(TrainConfig(corpus=[str(small_corpus)], preset="tiny", max_steps=5, out=str(tmp_path / "r"),
                                  quiet=True))
    assert isinstance(trainer.corpus.train, np.memmap)
    assert trainer.fit().steps == 5


def test_processes_decide_the_weight_decay_together_after_warmup(small_corpus, tmp_path):
    run = tmp_path / "ddp"
    torchrun(small_corpus, run, *settings(**{"--preset": "medium", "--layers": 1, "--hidden": 16, "--batch-size": 8,
                                              "--warmup-steps": 2, "--time": "10m", "--max-steps": 55}))
    decided = [r for r in ckpt.read_metrics(run) if "weight_decay" in r]
    assert [r["step"] for r in decided] == [50]  # once, by every process at the same step (a collective)
    assert decided[0]["planned_epochs"] == pytest.approx(55 / 105, abs=0.05) and decided[0]["weight_decay"] == 0.0
    state = ckpt.load_checkpoint(run, which="last", with_train_state=True).train_state
    assert state["weight_decay_decided"] and round(state["planned_epochs"], 2) == decided[0]["planned_epochs"]
