"""The model's own pieces: fast CPU dropout and the layer-by-layer recurrent stack it needs."""

import pytest
import torch

import charnn.model as model_mod
from charnn.errors import CharnnError
from charnn.model import MASK_LEVELS, CharRNN, Dropout, ModelConfig, dropout, run_recurrent


def test_dropout_keeps_the_right_share_scaled_and_reproducibly():
    x = torch.ones(200_000)
    torch.manual_seed(3)
    y = dropout(x, 0.2)
    keep = round(0.8 * MASK_LEVELS) / MASK_LEVELS
    assert (y != 0).float().mean().item() == pytest.approx(keep, abs=0.005)
    values = torch.unique(y).tolist()
    assert len(values) == 2 and values[0] == 0 and values[1] == pytest.approx(1 / keep)
    torch.manual_seed(3)
    assert torch.equal(dropout(x, 0.2), y)  # seeded from torch's RNG: the same seed, the same masks
    assert not torch.equal(dropout(x, 0.2), y)  # and a new mask per call
    assert dropout(x, 0.2, training=False) is x and dropout(x, 0.0) is x


def test_dropout_gradient_is_the_mask():
    x = torch.randn(64, 32, requires_grad=True)
    y = dropout(x, 0.5)
    y.sum().backward()
    torch.testing.assert_close(x.grad, (y / x).detach())


def test_dropout_module_follows_train_and_eval():
    d = Dropout(0.3)
    x = torch.ones(1000)
    assert (d(x) == 0).any()
    assert torch.equal(d.eval()(x), x)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_layer_by_layer_stack_equals_the_fused_stack(cell, monkeypatch):
    """In training, dropout between layers runs the stack layer by layer: with the mask taken out,
    exactly the library's multi-layer call."""
    torch.manual_seed(0)
    m = CharRNN(ModelConfig(vocab_size=30, cell=cell, layers=3, hidden=24, dropout=0.3)).train()
    x = m.embed(torch.randint(0, 30, (4, 17)))
    state = m.initial_state(4)
    calls = []
    monkeypatch.setattr(model_mod, "dropout", lambda t, p, training=True: calls.append(p) or t)
    out, new = run_recurrent(m.rnn, x, state)
    assert calls == [0.3, 0.3]  # between the three layers
    m.rnn.dropout = 0.0
    ref, ref_new = m.rnn(x, state)
    assert torch.equal(out, ref)
    for a, b in zip(new if cell == "lstm" else [new], ref_new if cell == "lstm" else [ref_new]):
        assert torch.equal(a, b)


def test_training_dropout_is_fast_masks_not_bernoulli():
    """A training step never runs torch's bernoulli (the slow CPU mask), inside the stack or out."""
    torch.manual_seed(0)
    m = CharRNN(ModelConfig(vocab_size=30, layers=2, hidden=24, dropout=0.3, embed_dropout=0.1)).train()
    with torch.profiler.profile() as prof:
        logits, _ = m(torch.randint(0, 30, (2, 9)))
        logits.sum().backward()
    ops = {e.key for e in prof.key_averages()}
    assert "aten::lstm" in ops or "aten::mkldnn_rnn_layer" in ops
    assert not {op for op in ops if "bernoulli" in op or op == "aten::dropout"}


def test_weight_drop_masks_the_recurrent_weights_in_training_only(monkeypatch):
    """--weight-drop drops recurrent weights (one mask per call); eval runs the whole weights."""
    torch.manual_seed(0)
    m = CharRNN(ModelConfig(vocab_size=30, layers=2, hidden=24, weight_drop=0.5))
    x = torch.randint(0, 30, (3, 11))
    seen = []
    real = model_mod.dropout
    monkeypatch.setattr(model_mod, "dropout", lambda t, p, training=True: seen.append(tuple(t.shape)) or real(t, p))
    m.train()
    dropped, _ = m(x)
    assert [s for s in seen if len(s) == 2] == [(96, 24), (96, 24)]  # each layer's weight_hh (4 gates x 24 units, 24 inputs)
    dropped.sum().backward()
    assert m.rnn.weight_hh_l0.grad is not None and m.rnn.weight_hh_l0.grad.abs().sum() > 0
    m.eval()
    seen.clear()
    full, _ = m(x)
    assert not [s for s in seen if len(s) == 2]
    m2 = CharRNN(ModelConfig(vocab_size=30, layers=2, hidden=24))
    m2.load_state_dict(m.state_dict())
    assert torch.equal(full, m2.eval()(x)[0])
    assert not torch.allclose(dropped, full)


def test_weight_drop_is_validated():
    with pytest.raises(CharnnError, match="^weight_drop must be in"):
        ModelConfig(vocab_size=30, weight_drop=1.0)
    with pytest.raises(CharnnError, match="needs the library cell"):
        ModelConfig(vocab_size=30, weight_drop=0.2, layer_norm=True)
