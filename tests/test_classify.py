"""Tests for charnn.classify and `charnn classify`: learning, transfer, round trips, resume, bad data."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from charnn.classify import (
    ClassifierEnsemble,
    ClassifierInterrupted,
    ClassifierNet,
    ClassifierTrainer,
    ClassifyConfig,
    MIN_CROP_CHARS,
    EnsembleTrainer,
    NotFittedError,
    TextClassifier,
    classification_report,
    collate,
    encode_labels,
    encode_texts,
    predict_logits,
    random_crops,
    read_labelled,
    stratified_split,
    truncate,
)
from charnn.cli import main
from charnn.errors import CharnnError
from charnn.lm import load_language_model
from charnn.model import ModelConfig

# Small and quick: a 1x32 LSTM learns the order task in a few seconds.
FAST = dict(hidden=32, embed_dim=16, lr=1e-2, batch_size=16, max_epochs=8, patience=3, device="cpu")
TUNE = {k: v for k, v in FAST.items() if k not in ("hidden", "embed_dim")}  # fine-tuning takes the LM's sizes


def order_task(n_pairs: int, seed: int) -> tuple[list[str], list[str]]:
    """Texts holding one 'x' and one 'y' among a-c letters; the label says which comes first.

    Every text's mirror (x and y swapped in place) is in the data with the other
    label, so both classes have exactly the same bags of characters: only the
    order of the characters tells them apart.
    """
    rng = random.Random(seed)
    texts, labels = [], []
    for _ in range(n_pairs):
        body = [rng.choice("abc") for _ in range(rng.randint(4, 10))]
        i, j = sorted(rng.sample(range(len(body) + 2), 2))
        for first, second, label in (("x", "y", "xy"), ("y", "x", "yx")):
            chars = body[:]
            chars.insert(i, first)
            chars.insert(j, second)
            texts.append("".join(chars))
            labels.append(label)
    return texts, labels


def write_tsv(path: Path, texts, labels, header=("text", "label")) -> Path:
    lines = ["\t".join(header)] + [f"{t}\t{l}" for t, l in zip(texts, labels)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def order_data():
    return order_task(300, 0), order_task(100, 1)


@pytest.fixture(scope="module")
def order_clf(order_data):
    (texts, labels), _ = order_data
    torch.manual_seed(0)
    return TextClassifier(**FAST).fit(texts, labels)


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, order_data):
    """A run trained through the CLI on TSV files, plus the test file."""
    (texts, labels), (test_texts, test_labels) = order_data
    root = tmp_path_factory.mktemp("cls")
    train = write_tsv(root / "train.tsv", texts, labels)
    test = write_tsv(root / "test.tsv", test_texts, test_labels)
    run = root / "run"
    args = ["classify", "train", str(train), "--out", str(run), "--hidden", "32", "--embed-dim", "16", "--lr", "0.01",
            "--batch-size", "16", "--max-epochs", "8", "--patience", "3", "--device", "cpu", "--quiet", "--json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return run, test, json.loads(result.output)


# -- learning --------------------------------------------------------------------------------------------
def test_order_task_needs_order_not_a_bag_of_characters(order_data):
    (texts, labels), _ = order_data
    bags = {}
    for t, label in zip(texts, labels):
        bags.setdefault("".join(sorted(t)), []).append(label)
    assert all(sorted(v).count("xy") == sorted(v).count("yx") for v in bags.values())


def test_learns_character_order_to_near_perfect_accuracy(order_clf, order_data):
    _, (test_texts, test_labels) = order_data
    assert order_clf.score(test_texts, test_labels) >= 0.97
    assert list(order_clf.classes_) == ["xy", "yx"]
    proba = order_clf.predict_proba(test_texts[:5])
    assert proba.shape == (5, 2) and np.allclose(proba.sum(1), 1.0, atol=1e-5)


def test_random_crops_are_windows_of_half_a_text_or_more():
    rng = np.random.default_rng(0)
    texts = [np.arange(n) for n in (5, 10, 11, 40, 301)]
    assert all(a is b for a, b in zip(random_crops(texts, 0.0, rng), texts))  # probability 0: untouched
    seen = set()
    for _ in range(200):
        for text, crop in zip(texts, random_crops(texts, 1.0, rng)):
            n = len(text)
            if n <= MIN_CROP_CHARS:
                assert crop is text  # too short to crop
                continue
            assert max(MIN_CROP_CHARS, n // 2) <= len(crop) <= n
            assert np.array_equal(crop, np.arange(crop[0], crop[0] + len(crop)))  # one contiguous window
            seen.add((n, int(crop[0]), len(crop)))
    assert len({s for s in seen if s[0] == 301}) > 100  # windows of every size and place, not one
    a = random_crops(texts, 0.5, np.random.default_rng([1234, 7]))
    b = random_crops(texts, 0.5, np.random.default_rng([1234, 7]))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))  # the same seed and step crop the same


def test_random_crops_reach_the_training_batches(order_data, monkeypatch):
    (texts, labels), _ = order_data
    texts = [t * 4 for t in texts]  # long enough to crop (the order task's texts are about MIN_CROP_CHARS long)
    import charnn.classify as classify_module

    def trained_chars(crop: float) -> int:
        seen, real = [], classify_module.collate
        monkeypatch.setattr(classify_module, "collate", lambda enc, idx: seen.append(sum(len(enc[i]) for i in idx)) or real(enc, idx))
        TextClassifier(**{**FAST, "random_crop": crop, "max_steps": 4, "val_fraction": 0.0}).fit(texts, labels)
        return sum(seen)

    whole, cropped = trained_chars(0.0), trained_chars(1.0)  # the same four batches (the order follows the seed)
    assert 0.5 * whole <= cropped < 0.9 * whole


def test_random_crop_fine_tuning_learns(order_data):
    """Training with crops still learns, though a crop may cut the x or the y out of an order-task text over
    MIN_CROP_CHARS long (its label is then wrong)."""
    (texts, labels), (test_texts, test_labels) = order_data
    clf = TextClassifier(**{**FAST, "random_crop": 0.3}).fit(texts, labels)
    assert clf.score(test_texts, test_labels) >= 0.9
    assert clf.checkpoint_config_["training"]["random_crop"] == 0.3
    trainer = ClassifierTrainer(ClassifyConfig(**{**FAST, "random_crop": 0.3}), texts, labels)
    assert "random crops (p 0.3)" in trainer.describe()


def test_fit_leaves_the_callers_random_state_alone(order_data):
    (texts, labels), _ = order_data
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    TextClassifier(hidden=8, embed_dim=4, max_steps=2, device="cpu").fit(texts[:40], labels[:40])  # seeds itself
    assert torch.equal(torch.rand(3), expected)


def test_bidirectional_and_pooling_options_learn(order_data):
    (texts, labels), (test_texts, test_labels) = order_data
    clf = TextClassifier(**{**FAST, "bidirectional": True, "pooling": "max", "cell": "gru"}).fit(texts, labels)
    assert clf.score(test_texts, test_labels) >= 0.95


def test_multi_label(tmp_path):
    rng = random.Random(3)
    texts, labels = [], []
    for _ in range(400):
        t = "".join(rng.choice("abcdxy") for _ in range(rng.randint(3, 9)))
        texts.append(t)
        labels.append(tuple(name for name, ch in (("has-x", "x"), ("has-y", "y")) if ch in t))
    clf = TextClassifier(**{**FAST, "multi_label": True, "pooling": "max", "balance": True}).fit(texts[:300], labels[:300])
    pred = clf.predict(texts[300:])
    assert pred.shape == (100, 2) and set(np.unique(pred)) <= {0, 1}
    assert list(clf.classes_) == ["has-x", "has-y"]
    report = clf.evaluate(texts[300:], labels[300:])
    assert report["multi_label"] and "confusion_matrix" not in report
    assert report["macro_f1"] >= 0.9
    assert clf.labels_of(pred[:3]) == [tuple(l) for l in labels[300:303]] or report["accuracy"] < 1
    clf.save(tmp_path / "ml")
    probe = ["axyab", "abcd", "xab"]
    expected = clf.labels_of(clf.predict(probe))
    lines = CliRunner().invoke(main, ["classify", "predict", str(tmp_path / "ml"), *probe]).stdout.splitlines()
    for line, text, chosen in zip(lines, probe, expected):  # the predicted labels, then each one's probability
        head, *scores, shown = line.split("\t")
        assert shown == text and head == ("|".join(chosen) or "-")
        assert [s.split(":")[0] for s in scores][:len(chosen)] == sorted(chosen, key=lambda c: -clf.predict_proba([text])[0][list(clf.classes_).index(c)])
        assert len(scores) == max(1, len(chosen))


# -- padding and packing -----------------------------------------------------------------------------------
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("pooling", ["last", "mean", "max", "concat"])
def test_padding_never_changes_a_texts_features(bidirectional, pooling):
    torch.manual_seed(0)
    net = ClassifierNet(ModelConfig(vocab_size=10, layers=2, hidden=8, embed_dim=4), 3, pooling, bidirectional).eval()
    rng = np.random.default_rng(0)
    encoded = [rng.integers(1, 10, size=n) for n in (3, 11, 7, 1)]
    alone = [net(*collate(encoded, np.array([i]))) for i in range(len(encoded))]
    modes = ["packed", "padded"] if not bidirectional else ["packed"]
    for mode in modes:
        net.packing = mode
        batched = net(*collate(encoded, np.arange(len(encoded))))
        for i in range(len(encoded)):
            assert torch.allclose(batched[i], alone[i][0], atol=1e-5), (mode, i)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_pooling_every_layer_adds_the_lower_layers_to_the_top_layers_exact_features(cell):
    config = ModelConfig(vocab_size=10, layers=3, hidden=8, embed_dim=4, cell=cell)
    torch.manual_seed(0)
    top = ClassifierNet(config, 3).eval()
    every = ClassifierNet(config, 3, pool_layers="all").eval()
    every.load_state_dict({k: v for k, v in top.state_dict().items() if not k.startswith("head.")}, strict=False)
    assert every.features == 3 * top.features and every.head.in_features == every.features
    rng = np.random.default_rng(0)
    encoded = [rng.integers(1, 10, size=n) for n in (3, 11, 7, 1)]
    batch = collate(encoded, np.arange(len(encoded)))
    features = every.encode(*batch)
    assert features.shape == (len(encoded), every.features)
    assert torch.equal(features[:, -top.features:], top.encode(*batch))  # layer by layer, the same kernel
    assert not torch.allclose(features[:, :top.features], features[:, -top.features:])
    for i in range(len(encoded)):  # padding reaches no layer's pooled features
        assert torch.allclose(every.encode(*collate(encoded, np.array([i])))[0], features[i], atol=1e-5)


def test_pooling_every_layer_needs_a_forward_stack():
    with pytest.raises(CharnnError, match="pool_layers='all' reads a forward stack"):
        ClassifierNet(ModelConfig(vocab_size=10, layers=2, hidden=8, embed_dim=4), 3, bidirectional=True,
                      pool_layers="all")
    with pytest.raises(CharnnError, match="pool_layers='all' reads a forward stack; drop bidirectional "):
        ClassifyConfig(bidirectional=True, pool_layers="all").validate()
    with pytest.raises(CharnnError, match="this encoder uses charnn's own cell .gate_slope or layer_norm.; drop pool_layers='all'"):
        ClassifierNet(ModelConfig(vocab_size=10, layers=2, hidden=8, embed_dim=4, layer_norm=True), 3, pool_layers="all")
    with pytest.raises(CharnnError, match="^pool_layers must be one of top, all, got 'every'"):
        ClassifyConfig(pool_layers="every").validate()


def test_newline_frame_and_every_layer_through_fit_save_load_and_the_cli(tiny_run, order_data, tmp_path):
    (texts, labels), (test_texts, _) = order_data
    settings = {**TUNE, "init_from": str(tiny_run), "newline_frame": True, "pool_layers": "all", "max_chars": 6,
                "max_steps": 3, "freeze_encoder": False}
    trainer = ClassifierTrainer(ClassifyConfig(**settings), texts[:64], labels[:64])
    newline = trainer.vocab.index["\n"]
    for ids, text in zip(trainer.train_ids, trainer.texts):  # truncated first, then framed
        assert ids[0] == ids[-1] == newline and len(ids) == min(len(text), 6) + 2
    assert "every layer pooled, texts framed by newlines" in trainer.describe()
    clf = TextClassifier(**settings, out=str(tmp_path / "run")).fit(texts[:64], labels[:64])
    meta = clf.checkpoint_config_["classifier"]
    assert meta["frame"] == "\n" and meta["pool_layers"] == "all"
    loaded = TextClassifier.load(tmp_path / "run")
    assert np.array_equal(loaded.predict_proba(test_texts), clf.predict_proba(test_texts))  # bit for bit
    framed = encode_texts(test_texts, loaded.vocab_, 6, "head", "\n")
    assert np.array_equal(loaded.decision_function(test_texts), predict_logits(loaded.net_, framed))
    assert not np.array_equal(loaded.decision_function(test_texts),
                              predict_logits(loaded.net_, encode_texts(test_texts, loaded.vocab_, 6, "head")))
    info = CliRunner().invoke(main, ["info", str(tmp_path / "run")])
    assert info.exit_code == 0, info.output
    assert "concat pooling of every layer" in info.output and "each text framed by newlines" in info.output
    bad = CliRunner().invoke(main, ["classify", "train", str(write_tsv(tmp_path / "d.tsv", texts, labels)),
                                    "--pool-layers", "all", "--bidirectional", "--out", str(tmp_path / "r2")])
    assert bad.exit_code != 0 and bad.output.count("\n") == 1 and "drop --bidirectional" in bad.output


def test_newline_frame_from_scratch_knows_the_newline_and_needs_one_in_a_language_model(tiny_run, order_data, tmp_path):
    (texts, labels), _ = order_data
    counts = Counter("".join(texts[:64]))
    most = max(counts.values())
    trainer = ClassifierTrainer(ClassifyConfig(**{**FAST, "newline_frame": True, "min_char_count": most, "val_fraction": 0.0}),
                                texts[:64], labels[:64])
    kept = sorted(c for c, n in counts.items() if n == most)
    assert trainer.vocab.chars[1:] == sorted(kept + ["\n"])  # however rare (here absent): the frame is never unknown
    lm = tmp_path / "lm"
    shutil.copytree(tiny_run, lm)
    for which in ("best", "last"):  # a language model whose corpus had no line breaks
        vocab = json.loads((lm / which / "vocab.json").read_text(encoding="utf-8"))
        vocab["chars"] = [c if c != "\n" else "\x01" for c in vocab["chars"]]
        (lm / which / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    with pytest.raises(CharnnError, match="^newline_frame needs a newline in the language model's vocabulary"):
        ClassifierTrainer(ClassifyConfig(**{**FAST, "init_from": str(lm), "newline_frame": True}), texts[:64], labels[:64])


# -- transfer from a language model ---------------------------------------------------------------------------
def lm_params(lm) -> dict[str, torch.Tensor]:
    return {**{f"embed.{k}": v for k, v in lm.embed.state_dict().items()},
            **{f"rnn.{k}": v for k, v in lm.rnn.state_dict().items()}}


def test_init_from_loads_encoder_weights_and_vocabulary_exactly(tiny_run, order_data, tmp_path):
    (texts, labels), _ = order_data
    lm, lm_ckpt = load_language_model(tiny_run)
    cfg = ClassifyConfig(**{**FAST, "init_from": str(tiny_run), "freeze_encoder": True, "max_epochs": 2,
                            "out": str(tmp_path / "run")})
    trainer = ClassifierTrainer(cfg, texts[:120], labels[:120])
    assert trainer.vocab == lm_ckpt.vocab
    assert trainer.encoder_config == lm.config
    net_params = trainer.net.state_dict()
    for name, value in lm_params(lm).items():
        assert torch.equal(net_params[name], value), name
    head_before = trainer.net.head.weight.detach().clone()
    trainer.fit()
    # a linear probe trains the head only: the encoder is still the language model's, in the checkpoint too
    saved = TextClassifier.load(tmp_path / "run").net_.state_dict()
    for name, value in lm_params(lm).items():
        assert torch.equal(saved[name], value), name
    assert not torch.equal(saved["head.weight"], head_before)


@pytest.fixture(scope="module")
def second_lm(tmp_path_factory, small_corpus) -> Path:
    """A language model like ``tiny_run`` (same corpus, so the same vocabulary) from another seed."""
    from charnn import TrainConfig, train

    out = tmp_path_factory.mktemp("runs") / "tiny-seed-7"
    train(TrainConfig(corpus=[str(small_corpus)], preset="tiny", max_steps=20, seed=7, out=str(out), quiet=True))
    return out


def test_an_ensemble_fine_tunes_each_member_from_its_own_language_model(tiny_run, second_lm, order_data, tmp_path):
    (texts, labels), _ = order_data
    models = [load_language_model(run)[0] for run in (tiny_run, second_lm)]
    assert not torch.equal(models[0].embed.weight, models[1].embed.weight)
    clf = TextClassifier(**{**TUNE, "max_epochs": 1, "freeze_encoder": True}, init_from=[tiny_run, str(second_lm)],
                         out=tmp_path / "run").fit(texts[:80], labels[:80])
    assert len(clf.result_.members) == 2  # one member per language model, without asking for an ensemble
    for member, lm in zip(clf.net_.members, models):  # a probe keeps each member's encoder its model's, exactly
        for name, value in lm_params(lm).items():
            assert torch.equal(member.state_dict()[name], value), name
    for i, run in enumerate((tiny_run, second_lm)):
        member_config = json.loads((tmp_path / "run" / f"member-{i + 1}" / "best" / "config.json").read_text())
        assert member_config["classifier"]["init_from"] == str(run / "best")
    info = CliRunner().invoke(main, ["info", str(tmp_path / "run")])
    assert info.exit_code == 0 and f"language models: {tiny_run / 'best'}, {second_lm / 'best'}" in info.output


def test_several_language_models_need_one_vocabulary_and_a_member_each(tiny_run, second_lm, order_data, small_corpus,
                                                                          tmp_path):
    from charnn import TrainConfig, train

    (texts, labels), _ = order_data
    other = tmp_path / "other.txt"
    other.write_text("abc xyz\n" * 500, encoding="utf-8")
    other_lm = tmp_path / "other-lm"
    train(TrainConfig(corpus=[str(other)], preset="tiny", max_steps=1, out=str(other_lm), quiet=True))
    with pytest.raises(CharnnError, match="have different vocabularies, and an ensemble reads its texts with one"):
        TextClassifier(**TUNE, init_from=[tiny_run, other_lm]).fit(texts[:40], labels[:40])
    wider = tmp_path / "wider-lm"  # same corpus, so the same vocabulary, but another size: one checkpoint cannot hold both
    train(TrainConfig(corpus=[str(small_corpus)], preset="tiny", hidden=24, max_steps=1, out=str(wider), quiet=True))
    with pytest.raises(CharnnError, match=r"differ in architecture \(hidden \d+ vs 24\); give init_from models of one"):
        TextClassifier(**TUNE, init_from=[tiny_run, wider]).fit(texts[:40], labels[:40])
    with pytest.raises(CharnnError, match=r"^ensemble must be at least the number of language models \(3, one member "):
        TextClassifier(**TUNE, init_from=[tiny_run, second_lm, tiny_run], ensemble=2).fit(texts[:40], labels[:40])
    assert ClassifyConfig(init_from=[tiny_run]).init_from == str(tiny_run)  # a list of one is that model
    assert ClassifyConfig(init_from=(tiny_run, second_lm), ensemble=4).ensemble == 4  # members take them in turn
    result = CliRunner().invoke(main, ["classify", "train", "--init-from", str(tiny_run), "--init-from", str(other_lm),
                                       "--out", str(tmp_path / "cli"), str(write_tsv(tmp_path / "d.tsv", texts[:40], labels[:40]))])
    assert result.exit_code == 2 and result.output.startswith("error: the language models ") and "--init-from" in result.output
    assert not (tmp_path / "cli").exists()


def test_gradual_unfreezing_and_discriminative_learning_rates(tiny_run, order_data):
    (texts, labels), _ = order_data
    lm, _ = load_language_model(tiny_run)
    cfg = ClassifyConfig(**{**FAST, "init_from": str(tiny_run), "max_epochs": 1, "val_fraction": 0.0,
                            "freeze_encoder": False})  # 4 steps per epoch would otherwise pick the linear probe
    trainer = ClassifierTrainer(cfg, texts[:64], labels[:64])
    groups = trainer.optimizer.param_groups
    assert len(groups) == 1 + lm.config.layers + 1  # head, each recurrent layer, embedding
    assert [g["base_lr"] for g in groups] == pytest.approx([cfg.lr / 2.6 ** i for i in range(len(groups))])
    assert trainer.trainable_groups() == 1
    trainer.fit()  # epoch 0: only the head learns
    for name, value in lm_params(lm).items():
        assert torch.equal(trainer.net.state_dict()[name], value), name
    trainer.epoch = 1
    assert trainer.trainable_groups() == 2
    trainer.epoch = 10
    assert trainer.trainable_groups() == len(groups)


@pytest.mark.parametrize("n_texts, freeze, expect_probe", [
    (64, None, True),      # 4 steps per epoch: too few for gradual unfreezing, so the probe is chosen
    (512, None, False),    # 32 steps per epoch: gradual unfreezing
    (64, False, False),    # an explicit choice wins either way
    (512, True, True),
    (64, "gradual", False),  # asking for gradual unfreezing asks to fine-tune
    (64, "crop", False),  # so does asking for random crops (a probe reads whole texts once)
])
def test_small_labelled_sets_fine_tune_as_a_linear_probe(tiny_run, order_data, n_texts, freeze, expect_probe):
    (texts, labels), _ = order_data
    texts, labels = (texts * 4)[:n_texts], (labels * 4)[:n_texts]
    lm, _ = load_language_model(tiny_run)
    gradual = True if freeze == "gradual" else None
    crop = 0.5 if freeze == "crop" else 0.0
    freeze = None if freeze in ("gradual", "crop") else freeze
    cfg = ClassifyConfig(**{**FAST, "init_from": str(tiny_run), "max_epochs": 3, "val_fraction": 0.0,
                            "freeze_encoder": freeze, "gradual_unfreeze": gradual, "random_crop": crop})
    trainer = ClassifierTrainer(cfg, texts, labels)
    assert trainer.steps_per_epoch == n_texts // FAST["batch_size"]
    assert trainer.cfg.freeze_encoder is expect_probe  # the run records what it used
    assert ("linear probe" in trainer.describe()) is expect_probe
    assert ("--no-freeze-encoder fine-tunes anyway" in trainer.describe()) is (expect_probe and freeze is None)
    trainer.fit()
    encoder_kept = all(torch.equal(trainer.net.state_dict()[k], v) for k, v in lm_params(lm).items())
    assert encoder_kept is expect_probe


def test_a_probe_run_reports_its_choice_and_leaves_the_encoder_alone(tiny_run, order_data, tmp_path):
    (texts, labels), _ = order_data
    cfg = ClassifyConfig(hidden=32, embed_dim=16, device="cpu", init_from=str(tiny_run), freeze_encoder=True,
                         out=str(tmp_path / "run"))
    trainer = ClassifierTrainer(cfg, texts[:200], labels[:200])
    encoder_before = {k: v.clone() for k, v in trainer.net.state_dict().items() if not k.startswith("head")}
    result = trainer.fit()
    assert result.stop_reason == "linear-probe" and result.steps == 0
    assert result.probe["c"] in [float(c) for c in result.probe["cv_loss"]]
    assert result.probe["cv_loss"][f"{result.probe['c']:g}"] == min(result.probe["cv_loss"].values())
    after = trainer.net.state_dict()
    assert all(torch.equal(after[k], v) for k, v in encoder_before.items())
    metrics = [line for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if "cv_log_loss" in line]
    assert len(metrics) == len(result.probe["cv_loss"])
    assert result.best_val_f1 is not None and (tmp_path / "run" / "best").is_dir()


@pytest.mark.parametrize("flag, expect_probe", [(None, True), ("--no-freeze-encoder", False)])
def test_cli_says_when_it_chose_the_linear_probe(tiny_run, order_data, tmp_path, flag, expect_probe):
    (texts, labels), _ = order_data
    data = write_tsv(tmp_path / "few.tsv", texts[:60], labels[:60])
    args = ["classify", "train", str(data), "--init-from", str(tiny_run), "--max-epochs", "1",
            "--out", str(tmp_path / "r"), *([flag] if flag else [])]
    out = CliRunner().invoke(main, args)
    assert out.exit_code == 0, out.output
    assert ("too few for gradual unfreezing" in out.output) is expect_probe
    assert ("done (linear probe, C " in out.output and "chosen by 5-fold cross-validation" in out.output) is expect_probe
    saved = json.loads((tmp_path / "r" / "best" / "config.json").read_text())
    assert saved["training"]["freeze_encoder"] is expect_probe


def test_cli_help_states_the_probe_threshold_in_use():
    from charnn.classify import PROBE_BELOW_STEPS_PER_EPOCH

    out = CliRunner().invoke(main, ["classify", "train", "--help"])
    assert f"an epoch is under {PROBE_BELOW_STEPS_PER_EPOCH} steps" in " ".join(out.output.split())


def test_classifier_from_scratch_never_freezes(order_data):
    (texts, labels), _ = order_data
    trainer = ClassifierTrainer(ClassifyConfig(**{**FAST, "max_epochs": 1}), texts[:40], labels[:40])
    assert trainer.cfg.freeze_encoder is False and trainer.trainable_groups() == len(trainer.groups)


def test_fine_tuning_refuses_bidirectional(tiny_run):
    with pytest.raises(CharnnError, match="bidirectional"):
        ClassifyConfig(init_from=str(tiny_run), bidirectional=True).validate()


@pytest.mark.parametrize("settings, message", [
    ({"gradual_unfreeze": True}, "^gradual_unfreeze unfreezes a language model's layers.*init_from"),
    ({"gradual_unfreeze": True, "freeze_encoder": True, "init_from": "lm"}, "nothing to unfreeze"),
    ({"random_crop": 0.5, "freeze_encoder": True, "init_from": "lm"}, "nothing to crop; drop random_crop"),
    ({"random_crop": 1.5}, r"^random_crop must be a probability in \[0, 1\], got 1.5"),
    ({"random_crop": -0.1}, "^random_crop must be a probability"),
])
def test_contradictory_transfer_options_are_refused(settings, message):
    with pytest.raises(CharnnError, match=message):
        ClassifyConfig(**settings).validate()


def test_cli_refuses_options_it_would_ignore(tiny_run, order_data, tmp_path):
    (texts, labels), _ = order_data
    data = write_tsv(tmp_path / "train.tsv", texts[:60], labels[:60])
    out = CliRunner().invoke(main, ["classify", "train", str(data), "--init-from", str(tiny_run), "--hidden", "16",
                                    "--cell", "gru", "--out", str(tmp_path / "ft")])
    assert out.exit_code == 2 and not (tmp_path / "ft").exists()
    assert out.output.startswith("error: --cell, --hidden: with --init-from the encoder is the language model's")
    args = ["classify", "train", str(data), "--hidden", "16", "--embed-dim", "8", "--max-epochs", "1", "--device", "cpu",
            "--quiet", "--out", str(tmp_path / "run")]
    assert CliRunner().invoke(main, args).exit_code == 0
    resumed = CliRunner().invoke(main, ["classify", "train", "--resume", str(tmp_path / "run"), "--lr", "0.1",
                                        "--max-epochs", "2"])
    assert resumed.exit_code == 2 and "error: --lr: a resumed run keeps its own settings" in resumed.output


def test_init_from_a_classifier_is_refused(cli_run, order_data):
    run, _, _ = cli_run
    (texts, labels), _ = order_data
    with pytest.raises(CharnnError, match="not a language model"):
        ClassifierTrainer(ClassifyConfig(**{**FAST, "init_from": str(run)}), texts[:20], labels[:20])


# -- checkpoints, CLI round trip ---------------------------------------------------------------------------------
def test_predict_and_eval_round_trip_through_a_checkpoint(cli_run, order_data):
    run, test_file, train_result = cli_run
    _, (test_texts, test_labels) = order_data
    assert (run / "best" / "model.safetensors").is_file() and (run / "last" / "train_state.json").is_file()
    assert (run / "metrics.jsonl").is_file()
    assert train_result["best_val_f1"] >= 0.9
    clf = TextClassifier.load(run)
    api_proba = clf.predict_proba(test_texts[:4])
    runner = CliRunner()
    out = runner.invoke(main, ["classify", "predict", str(run), *test_texts[:4], "--json"])
    assert out.exit_code == 0, out.output
    preds = json.loads(out.output)["predictions"]
    assert [p["label"] for p in preds] == list(clf.predict(test_texts[:4]))
    for p, row in zip(preds, api_proba):
        assert [p["probabilities"][c] for c in clf.classes_] == pytest.approx(row.tolist(), abs=1e-6)
    text_out = runner.invoke(main, ["classify", "predict", str(run)], input="\n".join(test_texts[:3]) + "\n")
    assert text_out.exit_code == 0, text_out.output
    lines = text_out.output.strip().splitlines()
    assert [l.split("\t")[0] for l in lines] == list(clf.predict(test_texts[:3]))
    assert [l.split("\t")[-1] for l in lines] == test_texts[:3]
    ev = runner.invoke(main, ["classify", "eval", str(run), str(test_file), "--json"])
    assert ev.exit_code == 0, ev.output
    report = json.loads(ev.output)
    assert report["accuracy"] == pytest.approx(clf.score(test_texts, test_labels))
    assert report["accuracy"] >= 0.95 and report["macro_f1"] >= 0.95
    assert sum(map(sum, report["confusion_matrix"])) == len(test_texts)
    assert {r["label"] for r in report["per_class"]} == {"xy", "yx"}
    table = runner.invoke(main, ["classify", "eval", str(run), str(test_file)])
    assert table.exit_code == 0 and "confusion matrix" in table.output and "macro-F1" in table.output


def test_save_and_load_give_identical_predictions(order_clf, order_data, tmp_path):
    _, (test_texts, _) = order_data
    order_clf.save(tmp_path / "model")
    loaded = TextClassifier.load(tmp_path / "model")
    assert np.array_equal(loaded.predict_proba(test_texts), order_clf.predict_proba(test_texts))
    assert loaded.get_params()["hidden"] == 32


def test_save_under_a_file_is_a_clear_error(order_clf, tmp_path):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("keep me")
    with pytest.raises(CharnnError, match=r"cannot create directory .*notes.txt \(.*notes.txt is a file\); give the checkpoint in a folder"):
        order_clf.save(blocker / "model")
    assert blocker.read_text() == "keep me"


def test_save_never_replaces_another_model_or_a_runs_checkpoint(order_clf, order_data, cli_run, tiny_run, tmp_path):
    _, (test_texts, _) = order_data
    run, _, _ = cli_run
    lm_copy, run_copy = tmp_path / "lm", tmp_path / "run"
    shutil.copytree(tiny_run, lm_copy)
    shutil.copytree(run, run_copy)
    before = {p: (p / "model.safetensors").read_bytes() for p in (lm_copy / "best", run_copy / "best")}
    with pytest.raises(CharnnError, match="holds a language-model checkpoint; save the classifier to another folder"):
        order_clf.save(lm_copy / "best", overwrite=True)
    with pytest.raises(CharnnError, match="is a checkpoint of the run .*; save to another folder"):
        order_clf.save(run_copy / "best", overwrite=True)
    assert {p: (p / "model.safetensors").read_bytes() for p in before} == before
    saved = order_clf.save(tmp_path / "model")
    with pytest.raises(CharnnError, match="already holds a classifier checkpoint; pass overwrite=True to replace it"):
        order_clf.save(saved)
    assert order_clf.save(saved, overwrite=True) == saved
    assert np.array_equal(TextClassifier.load(saved).predict_proba(test_texts), order_clf.predict_proba(test_texts))


def test_a_saved_checkpoint_is_not_mistaken_for_a_run(order_clf, cli_run, tmp_path):
    """run_dir_ of a checkpoint saved with save() was its parent folder, which predict --json and eval reported
    as the checkpoint; it is None, and the CLI names the checkpoint it was given."""
    run, _, _ = cli_run
    assert TextClassifier.load(run).run_dir_ == run and TextClassifier.load(run / "last").run_dir_ == run
    saved = order_clf.save(tmp_path / "models" / "order")
    assert TextClassifier.load(saved).run_dir_ is None
    out = CliRunner().invoke(main, ["classify", "predict", str(saved), "--json", "xaby"])
    assert out.exit_code == 0 and json.loads(out.output)["checkpoint"] == str(saved)


def test_eval_writes_a_confusion_matrix_png(cli_run, tmp_path):
    pytest.importorskip("matplotlib")
    run, test_file, _ = cli_run
    png = tmp_path / "plots" / "cm.png"  # a missing folder is made, as for charnn plot -o
    out = CliRunner().invoke(main, ["classify", "eval", str(run), str(test_file), "--plot", str(png)])
    assert out.exit_code == 0, out.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me", encoding="utf-8")
    again = CliRunner().invoke(main, ["classify", "eval", str(run), str(test_file), "--plot", str(notes)])
    assert again.exit_code == 2 and again.stderr == f"error: {notes} already exists; pass --force to replace it, or " \
        "choose another --plot\n" and notes.read_text(encoding="utf-8") == "keep me"
    forced = CliRunner().invoke(main, ["classify", "eval", str(run), str(test_file), "--plot", str(png), "--force"])
    assert forced.exit_code == 0, forced.output


@pytest.mark.parametrize("crop", [0.0, 0.5])
def test_interrupt_then_resume_matches_an_uninterrupted_run(order_data, tmp_path, crop):
    (texts, labels), _ = order_data
    data = write_tsv(tmp_path / "train.tsv", texts[:200], labels[:200])
    cfg = dict(FAST, max_epochs=3, patience=None, head_dropout=0.3, embed_dropout=0.1, random_crop=crop)
    full = ClassifierTrainer.from_files(ClassifyConfig(**cfg, out=str(tmp_path / "full")), data)
    full.fit()

    def interrupt(record):
        if record.get("step") == 17 and "train_loss" in record:
            os.kill(os.getpid(), signal.SIGINT)

    cut = ClassifierTrainer.from_files(ClassifyConfig(**{**cfg, "log_every": 1}, out=str(tmp_path / "cut")), data,
                                       on_log=interrupt)
    with pytest.raises(ClassifierInterrupted, match="charnn classify train --resume"):
        cut.fit()
    assert cut.step == 17
    out = CliRunner().invoke(main, ["classify", "train", "--resume", str(tmp_path / "cut"), "--quiet", "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["steps"] == full.step
    a = TextClassifier.load(tmp_path / "full", which="last").net_.state_dict()
    b = TextClassifier.load(tmp_path / "cut", which="last").net_.state_dict()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_a_run_fitted_from_python_resumes_from_python(order_data, tmp_path):
    """Ctrl-C in TextClassifier.fit said 'resume with: charnn classify train --resume RUN', which refuses a run
    fitted on texts passed from Python; TextClassifier.resume takes the same texts again."""
    (texts, labels), (test_texts, _) = order_data
    settings = dict(FAST, max_epochs=2, patience=None, log_every=1)
    full = TextClassifier(**settings, out=tmp_path / "full").fit(texts[:160], labels[:160])

    def interrupt(record):
        if record.get("step") == 7 and "train_loss" in record:
            os.kill(os.getpid(), signal.SIGINT)

    run = tmp_path / "cut"
    with pytest.raises(ClassifierInterrupted, match=re.escape(f"resume with: TextClassifier.resume({str(run)!r}, texts, labels)")):
        TextClassifier(**settings, out=run).fit(texts[:160], labels[:160], on_log=interrupt)
    out = CliRunner().invoke(main, ["classify", "train", "--resume", str(run)])
    assert out.exit_code == 2 and "TextClassifier.resume(" in out.output  # the fix the CLI can't do itself
    resumed = TextClassifier.resume(run, texts[:160], labels[:160])
    assert resumed.result_.steps == full.result_.steps and resumed.run_dir_ == run
    assert resumed.get_params()["max_epochs"] == 2
    assert np.array_equal(resumed.predict_proba(test_texts), full.predict_proba(test_texts))
    with pytest.raises(CharnnError, match="data changed"):
        TextClassifier.resume(run, texts[:100], labels[:100])


def test_resume_refuses_changed_data(order_data, tmp_path):
    (texts, labels), _ = order_data
    data = write_tsv(tmp_path / "train.tsv", texts[:100], labels[:100])
    ClassifierTrainer.from_files(ClassifyConfig(**{**FAST, "max_epochs": 1}, out=str(tmp_path / "run")), data).fit()
    write_tsv(data, texts[100:200], labels[100:200])
    with pytest.raises(CharnnError, match="data changed"):
        ClassifierTrainer.resume(tmp_path / "run", {"max_epochs": 2})



# -- ensembles -------------------------------------------------------------------------------------------------
def test_an_ensemble_averages_its_members_and_its_first_member_is_the_single_classifier(order_clf, order_data):
    (texts, labels), (test_texts, _) = order_data
    ens = TextClassifier(**FAST, ensemble=2).fit(texts, labels)
    assert isinstance(ens.net_, ClassifierEnsemble) and len(ens.net_.members) == 2
    single = order_clf.net_.state_dict()
    first, second = (m.state_dict() for m in ens.net_.members)
    assert all(torch.equal(single[k], first[k]) for k in single)  # member 1: seed 1234, the single run exactly
    assert not torch.equal(first["head.weight"], second["head.weight"])  # member 2: seed 1235
    encoded = encode_texts(test_texts, ens.vocab_, None, "head")
    member_proba = [np.exp(predict_logits(m, encoded)) / np.exp(predict_logits(m, encoded)).sum(1, keepdims=True)
                    for m in ens.net_.members]
    assert ens.predict_proba(test_texts) == pytest.approx(np.mean(member_proba, 0), abs=1e-6)
    assert ens.result_.stop_reason == "ensemble" and [m["seed"] for m in ens.result_.members] == [1234, 1235]
    assert ens.score(test_texts, order_data[1][1]) >= 0.95


def test_multi_label_ensemble_averages_sigmoids():
    torch.manual_seed(0)
    members = [ClassifierNet(ModelConfig(vocab_size=5, hidden=8, embed_dim=4), 3) for _ in range(3)]
    ens = ClassifierEnsemble(members, multi_label=True).eval()
    ids, lengths = torch.randint(0, 5, (4, 6)), torch.tensor([6, 3, 1, 5])
    with torch.no_grad():
        expected = torch.stack([torch.sigmoid(m.eval()(ids, lengths)) for m in members]).mean(0)
        assert torch.sigmoid(ens(ids, lengths)).numpy() == pytest.approx(expected.numpy(), abs=1e-6)


def test_ensemble_run_round_trips_and_resumes_after_an_interrupt(order_data, tmp_path, monkeypatch):
    (texts, labels), (test_texts, test_labels) = order_data
    data = write_tsv(tmp_path / "train.tsv", texts[:200], labels[:200])
    test = write_tsv(tmp_path / "test.tsv", test_texts, test_labels)
    cfg = dict(FAST, max_epochs=3, patience=None, ensemble=2)
    full = EnsembleTrainer.from_files(ClassifyConfig(**cfg, out=str(tmp_path / "full")), data)
    full.fit()
    steps_per_member = full.finished[0]["steps"]

    def interrupt(record):  # in the second member
        if record.get("step") == 5 and "train_loss" in record and cut.current.cfg.member == 1:
            os.kill(os.getpid(), signal.SIGINT)

    cut = EnsembleTrainer.from_files(ClassifyConfig(**{**cfg, "log_every": 1}, out=str(tmp_path / "cut")), data,
                                     on_log=interrupt)
    with pytest.raises(ClassifierInterrupted, match=f"--resume {tmp_path / 'cut'}") as stopped:
        cut.fit()
    assert stopped.value.checkpoint == tmp_path / "cut" / "member-2" / "last"  # what the CLI reports as saved
    assert json.loads((tmp_path / "cut" / "ensemble.json").read_text())["members"][0]["member"] == 1
    assert not (tmp_path / "cut" / "best").exists()
    resumed, resume = [], ClassifierTrainer.resume.__func__
    monkeypatch.setattr(ClassifierTrainer, "resume",
                        classmethod(lambda cls, run_dir, *a, **k: resumed.append(Path(run_dir)) or resume(cls, run_dir, *a, **k)))
    out = CliRunner().invoke(main, ["classify", "train", "--resume", str(tmp_path / "cut"), "--quiet", "--json"])
    assert out.exit_code == 0, out.output
    assert resumed == [tmp_path / "cut" / "member-2"]  # member 1 is loaded as it finished, member 2 continues
    assert json.loads(out.output)["steps"] == 2 * steps_per_member
    a, b = TextClassifier.load(tmp_path / "full"), TextClassifier.load(tmp_path / "cut")
    for name, value in a.net_.state_dict().items():
        assert torch.equal(value, b.net_.state_dict()[name]), name
    assert np.array_equal(a.predict_proba(test_texts), b.predict_proba(test_texts))
    ev = CliRunner().invoke(main, ["classify", "eval", str(tmp_path / "cut"), str(test), "--json"])
    assert ev.exit_code == 0, ev.output
    assert json.loads(ev.output)["accuracy"] == pytest.approx(b.score(test_texts, test_labels))


def test_cli_trains_an_ensemble_and_refuses_a_bad_size(order_data, tmp_path):
    (texts, labels), _ = order_data
    data = write_tsv(tmp_path / "train.tsv", texts[:200], labels[:200])
    args = ["classify", "train", str(data), "--hidden", "32", "--embed-dim", "16", "--lr", "0.01", "--batch-size", "16",
            "--max-epochs", "2", "--device", "cpu"]
    bad = CliRunner().invoke(main, [*args, "--ensemble", "0", "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "--ensemble must be at least 1" in bad.output
    assert "Traceback" not in bad.output and not (tmp_path / "bad").exists()
    ok = CliRunner().invoke(main, [*args, "--ensemble", "2", "--out", str(tmp_path / "run")])
    assert ok.exit_code == 0, ok.output
    assert "ensemble: 2 members (seeds 1234, 1235)" in ok.output and "done: 2 members" in ok.output
    assert {p.name for p in (tmp_path / "run").iterdir()} >= {"member-1", "member-2", "best", "ensemble.json"}
    pred = CliRunner().invoke(main, ["classify", "predict", str(tmp_path / "run"), texts[0], "--json"])
    assert pred.exit_code == 0, pred.output
    info = CliRunner().invoke(main, ["info", str(tmp_path / "run")])
    assert info.exit_code == 0 and "ensemble: 2 members, mean probability; seed 1234 macro-F1" in info.output

# -- reading data ---------------------------------------------------------------------------------------------------
def test_reads_csv_tsv_jsonl_and_folders(tmp_path):
    (tmp_path / "d.csv").write_text('label,review\npos,"good, really"\nneg,"bad\nand worse"\n', encoding="utf-8")
    csv_data = read_labelled(tmp_path / "d.csv", text_col="review")
    assert csv_data.texts == ["good, really", "bad\nand worse"] and csv_data.labels == ["pos", "neg"]
    (tmp_path / "d.tsv").write_text('label\ttext\nham\t"quoted" at the start\nspam\twin\n', encoding="utf-8")
    assert read_labelled(tmp_path / "d.tsv").texts == ['"quoted" at the start', "win"]
    (tmp_path / "d.jsonl").write_text('{"text": "a", "label": "x"}\n\n{"text": "b", "label": ["x", "y"]}\n')
    multi = read_labelled(tmp_path / "d.jsonl", multi_label=True)
    assert multi.labels == [("x",), ("x", "y")]
    for label, names in (("cats", ["1.txt", "2.txt"]), ("dogs", ["a.txt"])):
        (tmp_path / "folders" / label).mkdir(parents=True)
        for n in names:
            (tmp_path / "folders" / label / n).write_text(f"{label} {n}", encoding="utf-8")
    folders = read_labelled(tmp_path / "folders")
    assert folders.labels == ["cats", "cats", "dogs"] and folders.texts[2] == "dogs a.txt"
    (tmp_path / "excel.csv").write_bytes(b"\xef\xbb\xbftext,label\nfine,pos\n")  # "CSV UTF-8" as spreadsheets save it
    assert read_labelled(tmp_path / "excel.csv").texts == ["fine"]
    (tmp_path / "bom.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n')
    assert read_labelled(tmp_path / "bom.jsonl").labels == ["x", "y"]


def test_folder_datasets_skip_hidden_folders(tmp_path):
    """Only hidden files were skipped: a label folder that is a git checkout added every file under its .git as a
    text of that label."""
    for label in ("cats", "dogs"):
        (tmp_path / label / "sub").mkdir(parents=True)
        (tmp_path / label / "sub" / "a.txt").write_text(f"{label} in a subfolder", encoding="utf-8")
        (tmp_path / label / ".hidden.txt").write_text("hidden", encoding="utf-8")
    (tmp_path / "cats" / ".git").mkdir()
    (tmp_path / "cats" / ".git" / "HEAD").write_text("ref: refs/heads/main", encoding="utf-8")
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "x.txt").write_text("cached", encoding="utf-8")
    data = read_labelled(tmp_path)
    assert data.texts == ["cats in a subfolder", "dogs in a subfolder"] and data.labels == ["cats", "dogs"]


def test_folder_texts_lose_the_final_newline_of_their_file(tmp_path):
    """Every text read from a file that ends its last line (as editors and echo write it) ended with a newline that
    the lines given to predict never have, so the classifier learned from a final character it then never saw."""
    for label, text in (("cats", "two\nlines\n"), ("dogs", "one line\n\n")):
        (tmp_path / label).mkdir()
        (tmp_path / label / "a.txt").write_text(text, encoding="utf-8")
    assert read_labelled(tmp_path).texts == ["two\nlines", "one line"]


def test_csv_files_separated_by_semicolons_or_tabs(tmp_path):
    """A .csv saved with semicolons (spreadsheets in locales with a decimal comma) or tabs had one column named
    'text;label' and was refused, or cut at the commas inside its texts."""
    for name, content in (("semi.csv", 'text;label\n"pain, beurre; lait";a\nsalut, toi;b\n'),
                          ("tabs.csv", 'text\tlabel\n"pain, beurre\tlait"\ta\nsalut, toi\tb\n')):
        (tmp_path / name).write_text(content, encoding="utf-8")
        data = read_labelled(tmp_path / name)
        assert data.texts == [f"pain, beurre{'; ' if name == 'semi.csv' else chr(9)}lait", "salut, toi"]
        assert data.labels == ["a", "b"]


def test_folder_datasets_refuse_an_unreadable_folder(tmp_path, monkeypatch):
    """A label folder (or a folder in one) that could not be listed silently gave no examples."""
    for folder in ("cats", "dogs", "dogs/locked"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "a.txt").write_text(folder, encoding="utf-8")
    real_scandir = os.scandir

    def scandir(path="."):
        if Path(path).name == "locked":  # as chmod 000 does (for all but root)
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(CharnnError, match=r"^cannot list folder .*locked \(Permission denied\)"):
        read_labelled(tmp_path)


def test_jsonl_labels_that_are_not_strings(tmp_path):
    """Labels were str() of the JSON value: true read as 'True', and in a multi-label list a null became the label
    'None' and an object the label "{'x': 1}"."""
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "label": true}\n{"text": "b", "label": 2}\n', encoding="utf-8")
    assert read_labelled(path).labels == ["true", "2"]
    path.write_text('{"text": "a", "label": ["x", null, false]}\n', encoding="utf-8")
    assert read_labelled(path, multi_label=True).labels == [("false", "x")]
    path.write_text('{"text": "a", "label": ["x", {"x": 1}]}\n', encoding="utf-8")
    with pytest.raises(CharnnError, match=r"line 1: a label is a dict; give labels as strings"):
        read_labelled(path, multi_label=True)


def test_reads_the_shared_datasets():
    from conftest import shared_file

    names = read_labelled(shared_file("datasets/names.tsv"))
    assert len(names.texts) == 19950 and len(set(names.labels)) == 20
    sms = read_labelled(shared_file("datasets/sms_spam.tsv"))
    assert len(sms.texts) == 5574 and set(sms.labels) == {"ham", "spam"}


@pytest.mark.parametrize("content, suffix, message", [
    ("name\tlabel\nAbe\tx\n", ".tsv", r"no column 'text' \(columns: name, label\).*with text_col$"),
    ("text\tcategory\nAbe\tx\n", ".tsv", r"no column 'label'.*with label_col$"),
    ("text\tlabel\nAbe\tx\n \ty\n", ".tsv", r"line 3: the text is empty"),
    ("text\tlabel\nAbe\t\n", ".tsv", r"line 2: the label is empty"),
    ("text\tlabel\n", ".tsv", r"holds no examples"),
    ("", ".csv", r"empty or has no header"),
    ('{"text": "a", "label": "x"}\nnot json\n', ".jsonl", r"line 2 is not valid JSON"),
    ("text,label\na,b\n", ".xlsx", r"cannot tell the format"),
    ("text,label,text\na,b,c\n", ".csv", r"names column 'text' 2 times; rename the copies"),
    # a quote left open swallowed the rows after it into one text (silently, where a later quote closed it)
    ('text,label\n"open,x\nnext,y\nlast,x\n', ".csv", r"line 2 is not valid CSV \(unexpected end of data at line 4\)"),
    ('text,label\n"open,x\nnext,y\nsaid "hi",x\nlast,y\n', ".csv", r"line 2 is not valid CSV \(',' expected"),
    ('text,label\n"two\nlines",\n', ".csv", r"line 2: the label is empty"),  # where the record starts
])
def test_malformed_files_give_clear_errors(tmp_path, content, suffix, message):
    path = tmp_path / f"data{suffix}"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(CharnnError, match=message):
        read_labelled(path)


def test_text_and_label_columns_must_differ(tmp_path):
    path = write_tsv(tmp_path / "d.tsv", ["a", "b"], ["x", "y"])
    with pytest.raises(CharnnError, match="^text_col and label_col both name 'label'"):
        read_labelled(path, text_col="label", label_col="label")


def test_cli_reports_bad_data_in_one_line(tmp_path):
    path = write_tsv(tmp_path / "bad.tsv", ["a", "b"], ["x", "y"], header=("name", "label"))
    out = CliRunner().invoke(main, ["classify", "train", str(path), "--out", str(tmp_path / "r")])
    assert out.exit_code == 2
    assert out.output.startswith("error: ") and "--text-col" in out.output and "Traceback" not in out.output


def test_a_single_class_is_refused(tmp_path):
    with pytest.raises(CharnnError, match="single class .'only'.*at least two"):
        TextClassifier(**FAST).fit(["abc", "abd", "abe"], ["only"] * 3)


def test_empty_texts_are_refused():
    with pytest.raises(CharnnError, match="text 1 .counting from 0. is empty"):
        TextClassifier(**FAST).fit(["abc", ""], ["a", "b"])
    with pytest.raises(CharnnError, match=r"^text 2 \(counting from 0\) is None, not a string"):
        TextClassifier(**FAST).fit(["abc", "abd", None], ["a", "b", "a"])


def test_labels_unseen_in_training_are_refused_at_eval(cli_run, order_data, tmp_path):
    run, _, _ = cli_run
    (texts, labels), _ = order_data
    bad = write_tsv(tmp_path / "eval.tsv", texts[:4], ["xy", "zz", "yx", "ww"])
    out = CliRunner().invoke(main, ["classify", "eval", str(run), str(bad)])
    assert out.exit_code == 2
    assert "not trained on: 'ww', 'zz'" in out.output and "Traceback" not in out.output
    assert "(the training labels, 2: 'xy', 'yx')" in out.output  # in order, whatever the hash seed


def test_validation_texts_and_labels_come_together(order_data):
    """val_texts without val_labels was a TypeError ('NoneType' has no len()); val_labels alone were ignored."""
    (texts, labels), (test_texts, test_labels) = order_data
    for val_texts, val_labels in ((test_texts, None), (None, test_labels)):
        with pytest.raises(CharnnError, match="give val_texts and val_labels together"):
            TextClassifier(**FAST).fit(texts, labels, val_texts=val_texts, val_labels=val_labels)


def test_validation_labels_unseen_in_training_are_refused(order_data):
    (texts, labels), _ = order_data
    with pytest.raises(CharnnError, match="validation labels that the training data lacks: 'new'.*every validation label must occur"):
        TextClassifier(**FAST).fit(texts[:20], labels[:20], val_texts=["xy"], val_labels=["new"])


def test_predict_refuses_a_language_model_checkpoint(tiny_run):
    out = CliRunner().invoke(main, ["classify", "predict", str(tiny_run), "text"])
    assert out.exit_code == 2 and "not a classifier" in out.output


# -- helpers --------------------------------------------------------------------------------------------------------
def test_stratified_split_keeps_every_class_on_both_sides():
    labels = ["a"] * 50 + ["b"] * 10 + ["c"] * 2 + ["d"]
    train, val = stratified_split(labels, 0.2, seed=7)
    assert len(set(train) | set(val)) == len(labels) and not set(train) & set(val)
    got = {k: sum(labels[i] == k for i in val) for k in "abcd"}
    assert got == {"a": 10, "b": 2, "c": 1, "d": 0}
    assert np.array_equal(stratified_split(labels, 0.2, seed=7)[1], val)
    assert not np.array_equal(stratified_split(labels, 0.2, seed=8)[1], val)


def test_truncation_keeps_head_tail_or_both():
    assert truncate("abcdefgh", 4, "head") == "abcd"
    assert truncate("abcdefgh", 4, "tail") == "efgh"
    assert truncate("abcdefgh", 5, "both") == "abcgh"
    assert truncate("abc", 4, "both") == "abc" and truncate("abcdef", None) == "abcdef"


def test_report_matches_scikit_learn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    y_true, y_pred = rng.integers(0, 4, 200), rng.integers(0, 4, 200)
    y_pred[y_pred == 3] = 2  # class 3 is never predicted
    rep = classification_report(y_true, y_pred, ["a", "b", "c", "d"])
    assert rep["accuracy"] == pytest.approx(metrics.accuracy_score(y_true, y_pred))
    assert rep["macro_f1"] == pytest.approx(metrics.f1_score(y_true, y_pred, average="macro", zero_division=0))
    p, r, _, _ = metrics.precision_recall_fscore_support(y_true, y_pred, zero_division=0)
    assert [c["precision"] for c in rep["per_class"]] == pytest.approx(p.tolist())
    assert [c["recall"] for c in rep["per_class"]] == pytest.approx(r.tolist())
    assert rep["confusion_matrix"] == metrics.confusion_matrix(y_true, y_pred).tolist()
    yt, yp = rng.integers(0, 2, (50, 3)), rng.integers(0, 2, (50, 3))
    multi = classification_report(yt, yp, ["x", "y", "z"])
    assert multi["macro_f1"] == pytest.approx(metrics.f1_score(yt, yp, average="macro"))
    assert multi["accuracy"] == pytest.approx(metrics.accuracy_score(yt, yp))


def test_balanced_class_weights(order_data):
    cfg = ClassifyConfig(**{**FAST, "balance": True, "val_fraction": 0.0})
    trainer = ClassifierTrainer(cfg, ["ab", "ba", "aa", "bb"], ["p", "p", "p", "q"])
    assert trainer.loss_weights.tolist() == pytest.approx([4 / (2 * 3), 4 / (2 * 1)])


def test_encode_labels_keeps_label_types():
    classes, y = encode_labels([3, 1, 3], multi_label=False)
    assert classes.tolist() == [1, 3] and y.tolist() == [1, 0, 1]
    classes, y = encode_labels(np.array([[1, 0], [1, 1]]), multi_label=True)
    assert classes.tolist() == [0, 1] and y.tolist() == [[1, 0], [1, 1]]
    # labels of mixed types keep their types (np.array made [1, 'a'] the strings ['1', 'a'], so fit refused its
    # own label 1 as 'not trained on')
    classes, y = encode_labels([1, "a", 1], multi_label=False)
    assert classes.tolist() == [1, "a"] and y.tolist() == [0, 1, 0]
    classes, y = encode_labels([(1, "a"), ("a",)], multi_label=True)
    assert classes.tolist() == [1, "a"] and y.tolist() == [[1, 1], [0, 1]]


# -- scikit-learn conventions -----------------------------------------------------------------------------------------
def test_labels_of_mixed_types_fit_predict_and_round_trip(tmp_path):
    texts, labels = order_task(20, 0)
    labels = [1 if label == "xy" else "yx" for label in labels]
    clf = TextClassifier(**{**FAST, "max_epochs": 1}).fit(texts, labels)
    assert clf.classes_.tolist() == [1, "yx"] and set(clf.predict(texts).tolist()) <= {1, "yx"}
    loaded = TextClassifier.load(clf.save(tmp_path / "mixed"))
    assert loaded.classes_.tolist() == [1, "yx"] and loaded.predict(texts).tolist() == clf.predict(texts).tolist()
    assert loaded.score(texts, labels) == clf.score(texts, labels)


def test_params_mirror_the_config():
    assert set(TextClassifier().get_params()) == set(ClassifyConfig().to_dict()) - {"member"}
    assert TextClassifier().config() == ClassifyConfig()


def test_scikit_learn_estimator_checks_that_apply():
    checks = pytest.importorskip("sklearn.utils.estimator_checks")
    est = TextClassifier(**FAST)
    for name in ("check_estimator_cloneable", "check_estimator_repr", "check_no_attributes_set_in_init",
                 "check_get_params_invariance", "check_set_params", "check_parameters_default_constructible",
                 "check_do_not_raise_errors_in_init_or_set_params", "check_estimators_unfitted",
                 "check_estimator_tags_renamed", "check_valid_tag_types"):
        getattr(checks, name)("TextClassifier", est)


def test_scikit_learn_tools_work_on_text(order_data):
    pytest.importorskip("sklearn")
    from sklearn.base import clone, is_classifier
    from sklearn.model_selection import cross_val_score

    (texts, labels), _ = order_data
    est = TextClassifier(**{**FAST, "max_epochs": 2})
    assert is_classifier(est)
    twin = clone(est)
    assert twin.get_params() == est.get_params() and not hasattr(twin, "net_")
    scores = cross_val_score(est, np.array(texts[:120]), np.array(labels[:120]), cv=2)
    assert scores.shape == (2,) and np.all((scores >= 0) & (scores <= 1))


def test_estimator_behaves_like_a_scikit_learn_classifier(order_clf, order_data):
    (texts, labels), (test_texts, _) = order_data
    with pytest.raises(NotFittedError):
        TextClassifier().predict(["abc"])
    with pytest.raises(NotFittedError):  # it was an AttributeError naming classes_
        TextClassifier().labels_of(np.zeros((1, 2)))
    assert isinstance(NotFittedError("x"), (ValueError, AttributeError))
    params = TextClassifier(**FAST).get_params()
    est = TextClassifier(**FAST)
    assert est.fit(texts[:40], labels[:40]) is est and est.get_params() == params  # fit returns self, params unchanged
    # deterministic: the same seed gives the same model; the order of texts at predict time does not matter
    again = TextClassifier(**FAST).fit(texts[:40], labels[:40])
    assert np.array_equal(again.predict_proba(test_texts), est.predict_proba(test_texts))
    p = order_clf.predict_proba(test_texts)
    perm = np.random.default_rng(0).permutation(len(test_texts))
    assert np.allclose(order_clf.predict_proba([test_texts[i] for i in perm]), p[perm], atol=1e-6)
    assert np.allclose(order_clf.predict_proba(test_texts[:7]), p[:7], atol=1e-6)
    with pytest.raises(CharnnError, match="not a string"):
        order_clf.predict([1.5, 2.0])
    # bad targets raise ValueError (InvalidInput) with scikit-learn's wording
    with pytest.raises(ValueError, match="requires y to be passed"):
        TextClassifier(**FAST).fit(texts[:4], None)
    with pytest.raises(ValueError, match="Unknown label type"):
        TextClassifier(**FAST).fit(texts[:4], [0.5, 1.5, 0.25, 2.0])
    with pytest.raises(ValueError, match="single class"):
        TextClassifier(**FAST).fit(texts[:4], [1, 1, 1, 1])


def test_charnn_works_without_scikit_learn():
    code = ("import sys; sys.modules['sklearn'] = None\n"
            "import charnn\n"
            "clf = charnn.TextClassifier(hidden=8, embed_dim=4, max_epochs=1, device='cpu')\n"
            "clf.fit(['ab', 'ba', 'abb', 'bba', 'aab', 'bab'], ['x', 'y', 'x', 'y', 'x', 'y'])\n"
            "print(clf.predict(['ab']).tolist(), sorted(clf.get_params())[:2])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "['balance', 'batch_size']" in out.stdout


@pytest.mark.parametrize("options, decay", [({"optimizer": "adamw"}, 0.01), ({"optimizer": "adamw", "weight_decay": 0.0}, 0.0),
                                            ({}, 0.0)], ids=["adamw-default", "adamw-no-decay", "adam"])
def test_classifier_weight_decay(order_data, options, decay):
    """A classifier's optimizer keeps PyTorch's own decay unless told otherwise; an explicit 0 means none."""
    (texts, labels), _ = order_data
    trainer = ClassifierTrainer(ClassifyConfig(**{**FAST, "val_fraction": 0.0, **options}), texts[:32], labels[:32])
    assert {g["weight_decay"] for g in trainer.optimizer.param_groups} == {decay}


def test_resuming_a_finished_run_changes_nothing(order_data, tmp_path):
    (texts, labels), _ = order_data
    data = write_tsv(tmp_path / "train.tsv", texts[:120], labels[:120])
    args = ["classify", "train", str(data), "--hidden", "16", "--embed-dim", "8", "--max-epochs", "1", "--device", "cpu",
            "--quiet"]
    assert CliRunner().invoke(main, [*args, "--out", str(tmp_path / "one")]).exit_code == 0
    assert CliRunner().invoke(main, [*args, "--ensemble", "2", "--out", str(tmp_path / "two")]).exit_code == 0
    before = (tmp_path / "one" / "last" / "model.safetensors").read_bytes()
    out = CliRunner().invoke(main, ["classify", "train", "--resume", str(tmp_path / "one")])
    assert out.exit_code == 2 and "already as much as the --max-epochs budget allows" in out.output
    assert (tmp_path / "one" / "last" / "model.safetensors").read_bytes() == before
    out = CliRunner().invoke(main, ["classify", "train", "--resume", str(tmp_path / "two")])
    assert out.exit_code == 2 and "is finished (ensemble); nothing is left to train" in out.output


def test_a_diverged_classifier_keeps_its_last_finite_model(order_data, tmp_path, blow_up):
    (texts, labels), _ = order_data
    blow_up(ClassifierTrainer, "net", lambda trainer: trainer.epoch == 1)  # from the second epoch's first step
    clf = TextClassifier(**{**FAST, "max_epochs": 3, "out": str(tmp_path / "run")}).fit(texts[:100], labels[:100])
    assert clf.result_.stop_reason == "diverged"
    assert all(torch.isfinite(p).all() for p in clf.net_.parameters())
    saved = TextClassifier.load(tmp_path / "run", which="last")
    assert all(torch.isfinite(p).all() for p in saved.net_.parameters())


def test_an_ensemble_stopped_before_saving_itself_can_be_finished(order_data, tmp_path):
    (texts, labels), _ = order_data
    data = write_tsv(tmp_path / "train.tsv", texts[:120], labels[:120])
    args = ["classify", "train", str(data), "--hidden", "16", "--embed-dim", "8", "--max-epochs", "1", "--device", "cpu",
            "--quiet", "--ensemble", "2", "--out", str(tmp_path / "two")]
    assert CliRunner().invoke(main, args).exit_code == 0
    shutil.rmtree(tmp_path / "two" / "best")  # as if stopped between the last member and the ensemble's save
    out = CliRunner().invoke(main, ["classify", "train", "--resume", str(tmp_path / "two"), "--quiet"])
    assert out.exit_code == 0, out.output
    assert (tmp_path / "two" / "best").is_dir()


def test_a_diverged_member_stops_the_ensemble(order_data, tmp_path, monkeypatch):
    (texts, labels), _ = order_data
    monkeypatch.setattr(ClassifierTrainer, "train_step", lambda self, idx: float("nan"))
    data = write_tsv(tmp_path / "train.tsv", texts[:120], labels[:120])
    out = CliRunner().invoke(main, ["classify", "train", str(data), "--hidden", "16", "--embed-dim", "8", "--ensemble",
                                    "2", "--device", "cpu", "--quiet", "--out", str(tmp_path / "two")])
    assert out.exit_code == 2 and "training diverged" in out.output and "nothing was saved" in out.output
    assert not (tmp_path / "two").exists()


def test_a_finished_linear_probe_is_not_fitted_again(tiny_run, order_data, tmp_path):
    (texts, labels), _ = order_data
    data = write_tsv(tmp_path / "few.tsv", texts[:60], labels[:60])
    args = ["classify", "train", str(data), "--init-from", str(tiny_run), "--quiet", "--out", str(tmp_path / "probe")]
    assert CliRunner().invoke(main, args).exit_code == 0
    metrics = (tmp_path / "probe" / "metrics.jsonl").read_text()
    out = CliRunner().invoke(main, ["classify", "train", "--resume", str(tmp_path / "probe")])
    assert out.exit_code == 2 and "is finished (linear-probe)" in out.output
    assert (tmp_path / "probe" / "metrics.jsonl").read_text() == metrics


def test_pathlib_paths_for_out_and_init_from(tiny_run, tmp_path):
    """A pathlib ``out`` or ``init_from`` is written to the run's JSON as a string (it failed with 'Object of type
    PosixPath is not JSON serializable' after training); the estimator's parameters keep what was passed."""
    texts, labels = order_task(20, 0)
    clf = TextClassifier(**{**FAST, "max_epochs": 1}, out=tmp_path / "run")
    assert clf.fit(texts, labels).run_dir_ == tmp_path / "run" and clf.get_params()["out"] == tmp_path / "run"
    tuned = TextClassifier(**{**TUNE, "max_epochs": 1}, init_from=Path(tiny_run)).fit(texts, labels)
    tuned.save(tmp_path / "saved")
    assert TextClassifier.load(tmp_path / "saved").init_from == str(tiny_run)


def test_encoder_settings_ignored_by_fine_tuning_are_a_warning(tiny_run):
    """From Python, hidden=32 with init_from trained the language model's own size without a word (the CLI refuses
    --hidden with --init-from); the settings that differ from their defaults are named in a warning."""
    texts, labels = order_task(20, 0)
    with pytest.warns(UserWarning, match=r"^hidden=32, embed_dim=16 ignored: with init_from the encoder is the "
                                         r"language model's") as caught:
        clf = TextClassifier(**{**FAST, "max_epochs": 1}, init_from=tiny_run).fit(texts, labels)
    assert caught[0].filename == __file__  # the warning points at the caller's line
    assert clf.checkpoint_config_["model"]["hidden"] != 32  # the language model's size
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TextClassifier(**{**TUNE, "max_epochs": 1}, init_from=tiny_run).fit(texts, labels)  # defaults: no warning
        TextClassifier(**{**FAST, "max_epochs": 1}).fit(texts, labels)  # from scratch they are used


@pytest.mark.parametrize("params, message", [
    ({"multi_label": "no"}, "multi_label must be True or False, got 'no'"),  # a truthy string trained multi-label
    ({"balance": "yes"}, "balance must be True or False, got 'yes'"),
    ({"batch_size": 16.0}, "batch_size must be an integer, got 16.0"),  # a TypeError from deep in the batching
    ({"hidden": 2.5}, "hidden must be an integer, got 2.5"),
    ({"lr": "0.01"}, "lr must be a number, got '0.01'"),
    ({"time_budget": "10m"}, "time_budget must be a number of seconds, got '10m'"),
    ({"seed": "a"}, "seed must be an integer, got 'a'"),
])
def test_parameters_of_the_wrong_type_are_clear_errors(params, message):
    texts, labels = order_task(10, 0)
    with pytest.raises(CharnnError, match=message):
        TextClassifier(**{**FAST, **params}).fit(texts, labels)
    ClassifyConfig(hidden=np.int64(8), lr=np.float32(0.01), max_epochs=2, multi_label=np.bool_(False)).validate()


def test_predict_reads_stdin_in_its_encoding(cli_run):
    run, _, _ = cli_run
    bad = CliRunner().invoke(main, ["classify", "predict", str(run)], input=b"xab\xe9y\n")
    assert bad.exit_code == 2 and bad.output.startswith("error: standard input is not valid utf-8 (byte 3"), bad.output
    assert "--encoding latin-1" in bad.output
    for args in (["--encoding", "latin-1"], ["--encoding", "latin-1", "--file", "-"]):
        good = CliRunner().invoke(main, ["classify", "predict", str(run), "--json", *args], input=b"xab\xe9y\n")
        assert good.exit_code == 0 and json.loads(good.output)["predictions"][0]["text"] == "xab\u00e9y", good.output


def test_predict_lines_end_at_newlines_only(cli_run, tmp_path):
    """str.splitlines cut a line holding a form feed, \\x85 or U+2028 into several texts, so the predictions no
    longer matched the file's lines."""
    run, _, _ = cli_run
    lines = ["xa\x0cby", "xab\u2028y", "yb\x85ax", "xaby"]
    (tmp_path / "in.txt").write_bytes(("\r\n".join(lines) + "\r\n").encode())
    for args, stdin in ((["--file", str(tmp_path / "in.txt")], None), ([], "\r\n".join(lines).encode())):
        out = CliRunner().invoke(main, ["classify", "predict", str(run), "--json", *args], input=stdin)
        assert out.exit_code == 0, out.output
        assert [p["text"] for p in json.loads(out.output)["predictions"]] == lines


def test_jsonl_strings_may_hold_unicode_line_separators(tmp_path):
    """JSON lets U+2028 and \\x85 stand unescaped in a string (json.dumps(..., ensure_ascii=False) writes them so);
    the reader cut the line there and called it invalid JSON."""
    records = [{"text": "one\u2028two", "label": "a"}, {"text": "caf\x85e\u2029", "label": "b"}]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    assert read_labelled(path).texts == [r["text"] for r in records]


def test_train_json_implies_quiet(order_data, tmp_path):
    """As charnn train --json: the JSON object alone, no description or progress bar on the terminal."""
    (texts, labels), _ = order_data
    data = write_tsv(tmp_path / "d.tsv", texts[:60], labels[:60])
    result = CliRunner().invoke(main, ["classify", "train", str(data), "--hidden", "8", "--max-steps", "2", "--json",
                                       "--out", str(tmp_path / "run")])
    assert result.exit_code == 0 and result.stderr == "", result.stderr
    assert json.loads(result.stdout)["run_dir"] == str(tmp_path / "run")

