"""The training tricks: gate slope, layer norm, initialisations, optimizers, clipping; charnn's own cell."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner

from charnn import TrainConfig, Trainer
from charnn import checkpoint as ckpt
from charnn.cells import CustomRecurrent
from charnn.cli import main
from charnn.errors import CharnnError
from charnn.lm import load_language_model
from charnn.model import GAUSSIAN_STD, CharRNN, ModelConfig, build_recurrent, init_recurrent
from charnn.training import ramped_weight_decay

TINY = dict(layers=2, hidden=32, embed_dim=16, batch_size=8, seq_len=24, warmup_steps=2, lr=3e-3, log_every=1,
            precision="fp32", device="cpu", quiet=True)


def train_few(corpus, out, steps=4, **options) -> Trainer:
    trainer = Trainer(TrainConfig(corpus=[str(corpus)], **{**TINY, **options}, max_steps=steps, eval_every=steps,
                                  out=str(out)))
    result = trainer.fit()
    assert result.stop_reason == "max-steps" and result.steps == steps
    return trainer


def assert_round_trip(trainer: Trainer, options: dict) -> None:
    """The options are in the saved config, and the reloaded model computes the same logits."""
    ck = ckpt.load_checkpoint(trainer.run_dir, which="last")
    model_fields = set(ModelConfig.__dataclass_fields__)
    for key, value in options.items():
        section = "model" if key in model_fields else "training"
        assert ck.config[section][key] == value, (section, key)
    model, _ = load_language_model(trainer.run_dir, which="last")
    assert type(model.rnn) is type(trainer.model.rnn)
    ids = torch.tensor([trainer.corpus.val[:40].tolist()])
    trainer.model.eval()
    with torch.no_grad():
        expected, state_a = trainer.model(ids)
        got, state_b = model(ids)
    assert torch.isfinite(expected).all()
    assert torch.equal(expected, got)
    for a, b in zip(state_a if isinstance(state_a, tuple) else (state_a,), state_b if isinstance(state_b, tuple) else (state_b,)):
        assert torch.equal(a, b)


# -- every option trains and survives the checkpoint -----------------------------------------------
OPTIONS = [
    dict(cell="lstm", gate_slope=2.0),
    dict(cell="gru", gate_slope=3.75),
    dict(cell="lstm", layer_norm=True),
    dict(cell="gru", layer_norm=True, gate_slope=2.0),
    dict(cell="rnn", layer_norm=True),
    dict(cell="rnn", activation="relu", init="identity"),
    dict(cell="rnn", activation="relu", init="identity", layer_norm=True),
    dict(cell="lstm", init="orthogonal"),
    dict(cell="lstm", init="xavier"),
    dict(cell="gru", init="gaussian"),
    dict(cell="lstm", init="default"),
    dict(optimizer="adam"),
    dict(optimizer="adamw"),
    dict(optimizer="rmsprop", lr=1e-3),
    dict(optimizer="sgd", lr=0.5, momentum=0.0),
    dict(optimizer="sgd", lr=0.1, momentum=0.9, nesterov=True),
    dict(grad_clip=0.0),
]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_option_trains_and_round_trips(small_corpus, tmp_path, options):
    trainer = train_few(small_corpus, tmp_path / "run", **options)
    if options.get("gate_slope", 1.0) != 1.0 or options.get("layer_norm"):
        assert isinstance(trainer.model.rnn, CustomRecurrent)
    else:
        assert isinstance(trainer.model.rnn, (nn.LSTM, nn.GRU, nn.RNN))
    assert_round_trip(trainer, options)


def test_custom_cell_learns(small_corpus, tmp_path):
    """Steep gates and layer norm lower the loss like the library cell does."""
    trainer = train_few(small_corpus, tmp_path / "run", steps=30, cell="lstm", gate_slope=2.0, layer_norm=True)
    trace = [r["train_loss"] for r in ckpt.read_metrics(trainer.run_dir) if "train_loss" in r]
    assert trace[-1] < trace[0] - 0.5, trace


def test_custom_cell_under_bf16_autocast(small_corpus, tmp_path):
    trainer = train_few(small_corpus, tmp_path / "run", steps=3, cell="gru", gate_slope=2.0, precision="bf16")
    assert trainer.last_val is not None and math.isfinite(trainer.last_val)


def test_cli_options_reach_the_checkpoint(small_corpus, tmp_path):
    out = tmp_path / "cli"
    args = ["train", str(small_corpus), "--out", str(out), "-q", "--max-steps", "3", "--layers", "1", "--hidden", "24",
            "--embed-dim", "8", "--batch-size", "4", "--seq-len", "16", "--precision", "fp32", "--cell", "lstm",
            "--gate-slope", "3.75", "--layer-norm", "--init", "gaussian", "--optimizer", "sgd", "--lr", "0.5",
            "--momentum", "0.9", "--nesterov", "--grad-clip", "0"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    config = ckpt.load_checkpoint(out, which="last").config
    assert {k: config["model"][k] for k in ("cell", "gate_slope", "layer_norm", "init")} == dict(
        cell="lstm", gate_slope=3.75, layer_norm=True, init="gaussian")
    assert {k: config["training"][k] for k in ("optimizer", "momentum", "nesterov", "grad_clip")} == dict(
        optimizer="sgd", momentum=0.9, nesterov=True, grad_clip=0.0)


def test_bad_trick_options_are_refused(small_corpus, tmp_path):
    with pytest.raises(CharnnError, match="gate_slope applies to LSTM and GRU cells"):
        ModelConfig(vocab_size=10, cell="rnn", gate_slope=2.0)
    with pytest.raises(CharnnError, match="^gate_slope must be positive"):
        ModelConfig(vocab_size=10, gate_slope=0.0)
    result = CliRunner().invoke(main, ["train", str(small_corpus), "--out", str(tmp_path / "x"), "--grad-clip", "-1"])
    assert result.exit_code == 2 and "--grad-clip must be 0 (off) or positive" in result.output
    assert "Traceback" not in result.output


# -- charnn's cell against the library's -----------------------------------------------------------
def library_and_custom(cell: str, slope: float = 1.0, **kw):
    config = ModelConfig(vocab_size=50, cell=cell, layers=3, hidden=20, embed_dim=12, dropout=0.0, **kw)
    library = build_recurrent(config)
    init_recurrent(library, config)
    custom = CustomRecurrent(ModelConfig(**{**config.to_dict(), "gate_slope": slope}) if cell != "rnn" else config)
    custom.load_state_dict(library.state_dict())
    return library, custom


def outputs_and_grads(module, x, state):
    out, final = module(x, state)
    finals = final if isinstance(final, tuple) else (final,)
    weights = torch.linspace(-1, 1, out.numel()).view_as(out)
    loss = (out * weights).sum() + sum((f * 0.7).sum() for f in finals)
    inputs = [x, *(state if isinstance(state, tuple) else (state,)), *module.parameters()]
    return out, finals, torch.autograd.grad(loss, inputs)


@pytest.mark.parametrize("cell,activation", [("lstm", "tanh"), ("gru", "tanh"), ("rnn", "tanh"), ("rnn", "relu")])
@pytest.mark.parametrize("scripted", [True, False], ids=["torchscript", "eager"])
def test_slope_one_matches_the_library_cell(cell, activation, scripted):
    torch.manual_seed(0)
    library, custom = library_and_custom(cell, activation=activation)
    custom.use_scripted = scripted
    x = torch.randn(4, 9, 12, requires_grad=True)
    h0 = torch.randn(3, 4, 20, requires_grad=True)
    state = (h0, torch.randn(3, 4, 20, requires_grad=True)) if cell == "lstm" else h0
    out_a, finals_a, grads_a = outputs_and_grads(library, x, state)
    out_b, finals_b, grads_b = outputs_and_grads(custom, x, state)
    assert out_b.shape == out_a.shape
    torch.testing.assert_close(out_b, out_a, rtol=1e-5, atol=1e-5)
    for a, b in zip(finals_a, finals_b):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # the inference path (no saved tensors) and no initial state
        torch.testing.assert_close(custom(x)[0], library(x)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_steep_gates_follow_the_formula(cell):
    """One step from a zero state: every gate is sigmoid(slope * pre-activation)."""
    torch.manual_seed(1)
    slope = 3.75
    custom_1 = CustomRecurrent(ModelConfig(vocab_size=50, cell=cell, layers=1, hidden=20, embed_dim=12, gate_slope=slope))
    x = torch.randn(2, 1, 12)
    w, b_ih, b_hh = custom_1.weight_ih_l0, custom_1.bias_ih_l0, custom_1.bias_hh_l0
    a = x[:, 0] @ w.t() + b_ih
    with torch.no_grad():
        out, _ = custom_1(x)
        if cell == "lstm":
            i, f, g, o = (a + b_hh).chunk(4, 1)
            c = torch.sigmoid(slope * i) * torch.tanh(g)
            expected = torch.sigmoid(slope * o) * torch.tanh(c)
        else:
            ar, az, an = a.chunk(3, 1)
            hr, hz, hn = b_hh.chunk(3)
            r, z = torch.sigmoid(slope * (ar + hr)), torch.sigmoid(slope * (az + hz))
            expected = (1 - z) * torch.tanh(an + r * hn)
    torch.testing.assert_close(out[:, 0], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_hand_written_backward_matches_autograd(cell):
    """The fused LSTM/GRU backward equals autograd through the step-by-step loop, with steep gates."""
    torch.manual_seed(2)
    _, fused = library_and_custom(cell, slope=2.5)
    _, looped = library_and_custom(cell, slope=2.5)
    looped.load_state_dict(fused.state_dict())
    looped._run_layer = _autograd_layer(looped)
    x = torch.randn(3, 11, 12, requires_grad=True)
    h0 = torch.randn(3, 3, 20, requires_grad=True)
    state = (h0, torch.randn(3, 3, 20, requires_grad=True)) if cell == "lstm" else h0
    out_a, finals_a, grads_a = outputs_and_grads(looped, x, state)
    out_b, finals_b, grads_b = outputs_and_grads(fused, x, state)
    torch.testing.assert_close(out_b, out_a)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def _autograd_layer(module: CustomRecurrent):
    """``module._run_layer`` through the autograd step loops (the layer-norm path, with norm off)."""
    from charnn.cells import _loop

    def run_layer(xp, h, c, k):
        w_hh, b_hh = module._p("weight_hh", k), module._p("bias_hh", k)
        empty = xp.new_empty(0)
        if module.cell == "lstm":
            return _loop("lstm")(xp, h, c, w_hh, module._lstm_scale(xp), False, empty, empty, empty, empty)
        out, h = _loop("gru")(xp, h, w_hh, b_hh, module.gate_slope, False, empty, empty)
        return out, h, None

    return run_layer


def test_custom_cell_dropout_between_layers():
    config = ModelConfig(vocab_size=50, cell="gru", layers=2, hidden=16, embed_dim=8, dropout=0.5, gate_slope=2.0)
    rnn = CustomRecurrent(config)
    x = torch.randn(2, 5, 8)
    rnn.eval()
    assert torch.equal(rnn(x)[0], rnn(x)[0])
    rnn.train()
    torch.manual_seed(0)
    a = rnn(x)[0]
    torch.manual_seed(1)
    assert not torch.equal(a, rnn(x)[0])


# -- initialisations --------------------------------------------------------------------------------
def test_layer_norm_parameters_escape_the_recurrent_init():
    model = CharRNN(ModelConfig(vocab_size=30, cell="lstm", layers=1, hidden=16, embed_dim=8, layer_norm=True,
                                init="orthogonal", forget_bias=1.0))
    rnn = model.rnn
    for part in ("ih", "hh", "cell"):
        assert torch.equal(getattr(rnn, f"ln_{part}_gain_l0"), torch.ones_like(getattr(rnn, f"ln_{part}_gain_l0")))
        assert not getattr(rnn, f"ln_{part}_shift_l0").any()
    assert torch.equal(rnn.bias_ih_l0[16:32], torch.ones(16))  # the forget bias still reaches the cell
    block = rnn.weight_hh_l0[:16]
    torch.testing.assert_close(block @ block.t(), torch.eye(16), atol=1e-5, rtol=0)


def test_gaussian_init_is_the_naive_scheme():
    torch.manual_seed(0)
    model = CharRNN(ModelConfig(vocab_size=30, cell="rnn", layers=1, hidden=256, embed_dim=64, init="gaussian"))
    for name in ("weight_hh_l0", "weight_ih_l0"):
        w = getattr(model.rnn, name)
        w = w.detach()
        assert abs(float(w.std()) - GAUSSIAN_STD) < 0.1 * GAUSSIAN_STD and abs(float(w.mean())) < 0.01
    assert not model.rnn.bias_ih_l0.any() and not model.rnn.bias_hh_l0.any()


def test_identity_init_is_the_irnn():
    model = CharRNN(ModelConfig(vocab_size=30, cell="rnn", layers=2, hidden=12, embed_dim=6, init="identity",
                                activation="relu"))
    assert model.rnn.nonlinearity == "relu"
    for k in range(2):
        assert torch.equal(getattr(model.rnn, f"weight_hh_l{k}"), torch.eye(12))
        assert not getattr(model.rnn, f"bias_hh_l{k}").any()


# -- weight decay: AdamW's decoupled decay for the medium preset, none for the others ------------------
MEDIUM_RAMP = [6.0, 10.0]


@pytest.mark.parametrize("options, optimizer_class, decay, ramp", [
    ({}, torch.optim.Adam, 0.0, None),  # no budget on a CPU: the small preset
    (dict(preset="medium"), torch.optim.AdamW, 0.2, MEDIUM_RAMP),
    (dict(time_budget=600.0), torch.optim.AdamW, 0.2, MEDIUM_RAMP),  # ten minutes on a CPU: medium
    (dict(preset="medium", optimizer="adam"), torch.optim.Adam, 0.0, None),
    (dict(optimizer="adamw"), torch.optim.AdamW, 0.01, None),  # another optimizer than the preset's: PyTorch's default
    (dict(optimizer="sgd", lr=0.1), torch.optim.SGD, 0.0, None),
    (dict(preset="medium", weight_decay=0.0), torch.optim.AdamW, 0.0, None),
    (dict(preset="medium", weight_decay=0.2), torch.optim.AdamW, 0.2, None),  # given: used as it is, from the start
    (dict(optimizer="adam", weight_decay=1e-4), torch.optim.Adam, 1e-4, None),
], ids=["small", "medium", "ten-minutes", "medium-adam", "small-adamw", "sgd", "medium-no-decay", "medium-fixed",
        "adam-l2"])
def test_weight_decay_defaults(small_corpus, tmp_path, options, optimizer_class, decay, ramp):
    trainer = train_few(small_corpus, tmp_path / "run", steps=2, **options)
    assert type(trainer.optimizer) is optimizer_class
    assert (trainer.cfg.weight_decay, trainer.cfg.weight_decay_ramp) == (decay, ramp)
    if ramp is None:
        assert [g["weight_decay"] for g in trainer.optimizer.param_groups] == [decay]
    else:  # two steps are far fewer than 6 epochs: no decay yet
        assert trainer.weight_decay == 0.0
    training = ckpt.load_checkpoint(trainer.run_dir, which="last").config["training"]
    assert (training["weight_decay"], training["weight_decay_ramp"]) == (decay, ramp)


@pytest.mark.parametrize("epochs, decay", [(3.0, 0.0), (6.0, 0.0), (8.0, 0.1), (10.0, 0.2), (40.0, 0.2),
                                           (math.inf, 0.2)])
def test_the_decay_ramp(epochs, decay):
    cfg = TrainConfig(weight_decay=0.2, weight_decay_ramp=MEDIUM_RAMP)
    assert ramped_weight_decay(cfg, epochs) == pytest.approx(decay)
    assert ramped_weight_decay(TrainConfig(weight_decay=0.2), epochs) == 0.2  # no ramp: fixed


@pytest.fixture(scope="module")
def short_corpus(tmp_path_factory, docs_text):
    """Text for 30 steps per epoch of a 4 x 16 batch."""
    path = tmp_path_factory.mktemp("short") / "short.txt"
    path.write_text(docs_text[:2200], encoding="utf-8")
    return path


RAMP_RUN = dict(preset="medium", layers=1, hidden=16, embed_dim=8, batch_size=4, seq_len=16, warmup_steps=2,
                precision="fp32", device="cpu", quiet=True, patience=None, average_last=0.0)


def ramp_trainer(corpus, out, **budget) -> Trainer:
    """A tiny run with the medium preset's decay ramp, on ``corpus``, with the given budget."""
    return Trainer(TrainConfig(corpus=[str(corpus)], out=str(out), **budget, **RAMP_RUN))


def decay_records(run_dir) -> list[dict]:
    """The metrics records of the decay's decisions."""
    return [r for r in ckpt.read_metrics(run_dir) if "weight_decay" in r]


@pytest.mark.parametrize("max_epochs, decay", [(4, 0.0), (8, 0.1), (12, 0.2)])
def test_medium_decay_follows_the_epoch_budget(short_corpus, tmp_path, max_epochs, decay):
    trainer = ramp_trainer(short_corpus, tmp_path / "r", max_epochs=max_epochs)
    result = trainer.fit()
    assert result.weight_decay == pytest.approx(decay) and trainer.weight_decay == pytest.approx(decay)
    decided = decay_records(trainer.run_dir)
    assert [(r["step"], r["planned_epochs"]) for r in decided] == [(0, max_epochs)]  # decided before the first step
    summary = ckpt.load_checkpoint(trainer.run_dir, which="last").config["summary"]
    assert summary["weight_decay"] == pytest.approx(decay)


def test_cli_prints_the_decay_it_chose(short_corpus, tmp_path):
    result = CliRunner().invoke(main, ["train", str(short_corpus), "--preset", "medium", "--layers", "1", "--hidden", "16",
                                       "--batch-size", "4", "--seq-len", "16", "--max-epochs", "8", "--precision", "fp32",
                                       "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    assert "weight decay 0.2 if the budget allows 10 epochs (none up to 6, linear between)" in result.output
    assert "weight decay 0.1 for 8.0 planned epochs" in result.output
    info = CliRunner().invoke(main, ["info", str(tmp_path / "r")])
    assert "optimizer: adamw lr 0.01, weight decay 0.1 (ramp over [6.0, 10.0] planned epochs)" in info.output


@pytest.mark.parametrize("seconds, start_up, decay", [
    (3.0, 0.0, 0.2),                          # 300 steps: 10 epochs
    (2.0, 0.0, 0.2 * (200 / 30 - 6) / 4),     # 200 steps: 6.7 epochs
    (3.0, 1.0, 0.2 * (200 / 30 - 6) / 4),     # a second of start-up leaves 200 steps, which the pace must not miss
], ids=["10-epochs", "6.7-epochs", "start-up"])
def test_a_time_budget_decides_the_decay_after_warmup_from_the_pace(short_corpus, tmp_path, monkeypatch,
                                                                    seconds, start_up, decay):
    # a steady clock, 100 steps a second, after ``start_up`` seconds spent in the first step
    monkeypatch.setattr(Trainer, "_elapsed", lambda self: (start_up if self.step else 0.0) + self.step * 0.01)
    trainer = ramp_trainer(short_corpus, tmp_path / "r", time_budget=seconds)
    assert trainer.steps_per_epoch == 30
    result = trainer.fit()
    assert result.stop_reason == "time" and result.weight_decay == pytest.approx(decay)
    steps = round((seconds - start_up) * 100)
    assert result.steps == steps
    decided = decay_records(trainer.run_dir)
    assert [r["step"] for r in decided] == [50]  # after the warmup, once the pace is known
    assert decided[0]["planned_epochs"] == pytest.approx(steps / 30, abs=0.01)


def test_the_decay_follows_a_pace_that_changes(short_corpus, tmp_path, monkeypatch):
    # 100 steps a second for the first 100 steps, then 50: 4 seconds give 250 steps, 8.3 epochs
    monkeypatch.setattr(Trainer, "_elapsed", lambda self: min(self.step, 100) * 0.01 + max(self.step - 100, 0) * 0.02)
    trainer = ramp_trainer(short_corpus, tmp_path / "r", time_budget=4.0)
    result = trainer.fit()
    assert result.steps == 250
    decided = decay_records(trainer.run_dir)
    assert decided[0]["step"] == 50 and decided[0]["weight_decay"] == pytest.approx(0.2)  # 13.3 epochs at first
    assert all(r["step"] % 30 == 0 for r in decided[1:])  # then revised at the start of each epoch
    assert decided[-1]["planned_epochs"] == pytest.approx(250 / 30, abs=0.2)
    assert result.weight_decay == decided[-1]["weight_decay"] < 0.13


def test_resume_keeps_the_decided_decay_and_a_new_budget_decides_again(short_corpus, tmp_path):
    trainer = ramp_trainer(short_corpus, tmp_path / "r", max_epochs=4)
    trainer.fit()
    again = Trainer.resume(trainer.run_dir)
    assert again.decay_decided and again.weight_decay == 0.0 and again.planned_epochs == 4
    longer = Trainer.resume(trainer.run_dir, {"max_epochs": 12})
    assert not longer.decay_decided
    assert longer.fit().weight_decay == pytest.approx(0.2) and longer.planned_epochs == 12


def test_cli_reports_the_optimizer_and_its_decay(small_corpus, tmp_path):
    base = ["train", str(small_corpus), "--max-steps", "2", "--layers", "1", "--hidden", "16", "--batch-size", "4",
            "--seq-len", "16", "--precision", "fp32"]
    result = CliRunner().invoke(main, base + ["--out", str(tmp_path / "medium"), "--preset", "medium"])
    assert result.exit_code == 0, result.output
    assert "adamw lr" in result.output and "weight decay 0.2" in result.output
    result = CliRunner().invoke(main, base + ["--out", str(tmp_path / "small")])
    assert result.exit_code == 0, result.output
    assert "adam lr" in result.output and "weight decay" not in result.output
    assert ckpt.load_checkpoint(tmp_path / "small", which="last").config["training"]["weight_decay"] == 0.0


def test_negative_weight_decay_is_refused(small_corpus, tmp_path):
    result = CliRunner().invoke(main, ["train", str(small_corpus), "--out", str(tmp_path / "x"), "--weight-decay", "-1"])
    assert result.exit_code == 2 and "--weight-decay must be 0 (off) or positive" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "x").exists()
