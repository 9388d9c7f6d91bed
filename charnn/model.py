"""The character model: embedding -> stacked LSTM/GRU/RNN -> linear softmax.

The recurrent stack uses PyTorch's fused kernels (oneDNN on CPU, cuDNN on
CUDA). ``CharRNN.forward`` takes and returns the recurrent state so callers
can carry it across chunks (training, validation, generation).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import CharnnError, check_settings, setting

CELLS = ("lstm", "gru", "rnn")
INITS = ("orthogonal", "identity", "xavier", "gaussian", "default")
MAX_WIDTH = 2**20  # hidden units or embedding size: far beyond any machine, and within torch's integer sizes
GAUSSIAN_STD = 0.05  # --init gaussian: N(0, 0.05^2), the Passage library's "normal" init (the naive baseline)
ACTIVATIONS = ("tanh", "relu")

State = "torch.Tensor | tuple[torch.Tensor, torch.Tensor]"


@dataclass
class ModelConfig:
    """Everything needed to rebuild a model's architecture."""

    vocab_size: int
    cell: str = "lstm"
    layers: int = 2
    hidden: int = 256
    embed_dim: int = 64  # 0 means one-hot input
    dropout: float = 0.0  # between recurrent layers and before the output layer
    embed_dropout: float = 0.0
    weight_drop: float = 0.0  # DropConnect on the recurrent (hidden-to-hidden) weights, a new mask per step (AWD-LSTM)
    tie_weights: bool = False
    init: str = "orthogonal"
    forget_bias: float = 1.0
    activation: str = "tanh"  # plain RNN only
    gate_slope: float = 1.0  # steeper gates, sigmoid(slope * x); needs the custom cell
    layer_norm: bool = False  # needs the custom cell

    def __post_init__(self):
        self.cell = self.cell.lower()
        checks = [
            (self.cell in CELLS, "cell", f"must be one of {', '.join(CELLS)}, got {self.cell!r}"),
            (self.layers >= 1, "layers", f"must be at least 1, got {self.layers}"),
            (1 <= self.hidden <= MAX_WIDTH, "hidden", f"must be in [1, {MAX_WIDTH:,}], got {self.hidden}"),
            (0 <= self.embed_dim <= MAX_WIDTH, "embed_dim", f"must be 0 (one-hot) or positive, at most {MAX_WIDTH:,}, "
             f"got {self.embed_dim}"),
            (0 <= self.dropout < 1, "dropout", f"must be in [0, 1), got {self.dropout}"),
            (0 <= self.embed_dropout < 1, "embed_dropout", f"must be in [0, 1), got {self.embed_dropout}"),
            (0 <= self.weight_drop < 1, "weight_drop", f"must be in [0, 1), got {self.weight_drop}"),
            (self.weight_drop == 0 or not self.uses_custom_cell, "weight_drop",
             f"needs the library cell; drop {setting('gate_slope')}/{setting('layer_norm')}"),
            (self.init in INITS, "init", f"must be one of {', '.join(INITS)}, got {self.init!r}"),
            (self.activation in ACTIVATIONS, "activation", f"must be tanh or relu, got {self.activation!r}"),
            (self.activation == "tanh" or self.cell == "rnn", None,
             f"{setting('activation', 'relu')} applies to {setting('cell', 'rnn')} only"),
            (self.gate_slope > 0 and math.isfinite(self.gate_slope), "gate_slope",
             f"must be positive (and finite), got {self.gate_slope}"),
            (math.isfinite(self.forget_bias), "forget_bias", f"must be a finite number, got {self.forget_bias}"),
            (self.gate_slope == 1.0 or self.cell != "rnn", "gate_slope",
             "applies to LSTM and GRU cells (a plain RNN has no gates)"),
            (self.vocab_size >= 2, None, "the vocabulary is empty; the training text has no characters"),
        ]
        check_settings(checks)

    @property
    def input_dim(self) -> int:
        return self.embed_dim or self.vocab_size

    @property
    def uses_custom_cell(self) -> bool:
        return self.gate_slope != 1.0 or self.layer_norm

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@contextlib.contextmanager
def fits_in_memory(config: ModelConfig):
    """Building (or moving) a model too large for this machine's memory, inside the block, is a CharnnError naming
    the sizes to lower (torch's allocators raise RuntimeError, CUDA's OutOfMemoryError)."""
    try:
        yield
    except (RuntimeError, MemoryError) as e:
        if not isinstance(e, MemoryError) and not any(s in str(e).lower() for s in ("alloc", "out of memory")):
            raise
        raise CharnnError(f"a model of {config.layers} x {config.hidden:,} units does not fit in this machine's "
                          f"memory; lower {setting('hidden')} or {setting('layers')}") from None


class CharRNN(nn.Module):
    """Character language model; ``forward(ids, state) -> (logits, state)``."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = c = config
        self.embed = nn.Embedding(c.vocab_size, c.input_dim)
        if not c.embed_dim:  # one-hot input: a frozen identity table
            self.embed.weight.data.copy_(torch.eye(c.vocab_size))
            self.embed.weight.requires_grad_(False)
        self.embed_drop = Dropout(c.embed_dropout)
        self.rnn = build_recurrent(c)
        self.out_drop = Dropout(c.dropout)
        out_dim = c.hidden
        self.proj = None
        if c.tie_weights:
            if not c.embed_dim:
                raise CharnnError(f"{setting('tie_weights')} needs an embedding; set {setting('embed_dim')} above 0")
            if c.embed_dim != c.hidden:
                self.proj = nn.Linear(c.hidden, c.embed_dim)
            out_dim = c.embed_dim
        self.head = nn.Linear(out_dim, c.vocab_size)
        if c.tie_weights:
            self.head.weight = self.embed.weight
        init_recurrent(self.rnn, c)

    def forward(self, ids: torch.Tensor, state=None):
        """Logits of shape (batch, time, vocab) and the state after the last step."""
        out, state = self.encode(ids, state)
        return self.decode(self.out_drop(out)), state

    def encode(self, ids: torch.Tensor, state=None):
        """Top-layer outputs (batch, time, hidden) and the final state, without the softmax head."""
        return run_recurrent(self.rnn, self.embed_drop(self.embed(ids)), state, self.config.weight_drop)

    def decode(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.proj is not None:
            hidden = self.proj(hidden)
        return self.head(hidden)

    def initial_state(self, batch_size: int, device=None, dtype=None):
        c = self.config
        p = next(self.rnn.parameters())
        z = torch.zeros(c.layers, batch_size, c.hidden, device=device or p.device, dtype=dtype or p.dtype)
        return (z, z.clone()) if c.cell == "lstm" else z

    def num_parameters(self, trainable_only: bool = True) -> int:
        seen = {}
        for p in self.parameters():
            if p.requires_grad or not trainable_only:
                seen[id(p)] = p.numel()
        return sum(seen.values())


# -- dropout -----------------------------------------------------------------------------------------
MASK_LEVELS = 256  # CPU dropout masks compare random bytes: the keep probability is rounded to 1/256


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """``F.dropout``, with masks from NumPy's PCG64 on the CPU.

    ``torch.bernoulli_`` fills masks at about 0.1 G elements/s on a CPU core,
    which made dropout 10-20% of a training step of the default models;
    random bytes from PCG64 compared with a threshold are several times faster.
    Each call seeds its generator from PyTorch's RNG, so ``torch.manual_seed``
    and a resumed RNG state still reproduce the masks. The keep probability is
    rounded to 1/256 (0.8 -> 205/256 = 0.8008) and kept values are scaled by its
    inverse, as ``F.dropout`` does. Other devices use ``F.dropout``.
    """
    if not training or p == 0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, True)
    keep = max(1, round((1 - p) * MASK_LEVELS))
    rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,))))
    kept = rng.integers(0, MASK_LEVELS, x.numel(), dtype=np.uint8) < keep
    mask = torch.from_numpy(kept).view(x.shape).to(x.dtype).mul_(MASK_LEVELS / keep)
    return x * mask


class Dropout(nn.Dropout):
    """``nn.Dropout`` through :func:`dropout` (fast masks on the CPU)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


def run_recurrent(rnn: nn.Module, x: torch.Tensor, state=None, weight_drop: float = 0.0):
    """``rnn(x, state)`` for a batch-first stack. In training, a library stack runs layer by layer
    through the same fused kernel when it has dropout between layers (on the CPU, so that
    :func:`dropout` draws the masks) or ``weight_drop``: DropConnect on each layer's recurrent
    weights, one mask per call shared by every time step (AWD-LSTM's weight drop)."""
    layered = isinstance(rnn, nn.RNNBase) and rnn.training and not rnn.bidirectional and rnn.batch_first and (
        weight_drop > 0 or (rnn.dropout > 0 and rnn.num_layers > 1 and x.device.type == "cpu"))
    if not layered:
        return rnn(x, state)
    out, state, _ = run_layers(rnn, x, state, weight_drop)
    return out, state


def run_layers(rnn: nn.RNNBase, x: torch.Tensor, state=None, weight_drop: float = 0.0):
    """A forward, batch-first library stack run one layer at a time through the fused kernel.

    Returns the top layer's outputs, the final state, and every layer's outputs (batch, time, hidden),
    bottom first. In training, dropout between layers applies as in the fused stack, and ``weight_drop``
    (DropConnect on the recurrent weights) as in :func:`run_recurrent`.
    """
    lstm = isinstance(rnn, nn.LSTM)
    if isinstance(rnn, nn.GRU):
        kernel = torch._VF.gru
    elif not lstm:
        kernel = torch._VF.rnn_tanh if rnn.nonlinearity == "tanh" else torch._VF.rnn_relu
    if state is None:
        zeros = x.new_zeros(rnn.num_layers, x.size(0), rnn.hidden_size)
        state = (zeros, zeros.clone()) if lstm else zeros
    out, hs, cs, outputs = x, [], [], []
    for k in range(rnn.num_layers):
        weights = [getattr(rnn, f"{name}_l{k}") for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
        if weight_drop > 0 and rnn.training:
            weights[1] = dropout(weights[1], weight_drop)
        if k:
            out = dropout(out, rnn.dropout, rnn.training)
        if lstm:
            out, h, c = torch._VF.lstm(out, (state[0][k:k + 1], state[1][k:k + 1]), weights, True, 1, 0.0,
                                       rnn.training, False, True)
            cs.append(c)
        else:
            out, h = kernel(out, state[k:k + 1], weights, True, 1, 0.0, rnn.training, False, True)
        hs.append(h)
        outputs.append(out)
    return out, ((torch.cat(hs), torch.cat(cs)) if lstm else torch.cat(hs)), outputs


def build_recurrent(c: ModelConfig) -> nn.Module:
    """The fused library stack, or charnn's own cell for options the library lacks."""
    if c.uses_custom_cell:
        from .cells import CustomRecurrent  # noqa: PLC0415 (only needed for these options)

        return CustomRecurrent(c)
    kwargs = dict(num_layers=c.layers, batch_first=True, dropout=c.dropout if c.layers > 1 else 0.0)
    if c.cell == "lstm":
        return nn.LSTM(c.input_dim, c.hidden, **kwargs)
    if c.cell == "gru":
        return nn.GRU(c.input_dim, c.hidden, **kwargs)
    return nn.RNN(c.input_dim, c.hidden, nonlinearity=c.activation, **kwargs)


def gate_count(cell: str) -> int:
    return {"lstm": 4, "gru": 3, "rnn": 1}[cell]


@torch.no_grad()
def init_recurrent(rnn: nn.Module, c: ModelConfig) -> None:
    """Initialise recurrent weights per ``c.init``, and the LSTM forget-gate bias.

    Recurrent matrices are initialised one gate block at a time, so every
    gate's hidden-to-hidden map is orthogonal (or the identity). ``gaussian``
    draws every weight from N(0, GAUSSIAN_STD^2) and zeroes the biases.
    """
    gates = gate_count(c.cell)
    for name, p in rnn.named_parameters():
        if c.init == "gaussian" and ("weight_hh" in name or "weight_ih" in name):
            nn.init.normal_(p, 0.0, GAUSSIAN_STD)
        elif "weight_hh" in name and c.init != "default":
            for block in p.view(gates, c.hidden, c.hidden):
                if c.init == "orthogonal":
                    nn.init.orthogonal_(block)
                elif c.init == "identity":
                    block.copy_(torch.eye(c.hidden))
                else:
                    nn.init.xavier_uniform_(block)
        elif "weight_ih" in name and c.init in ("xavier", "orthogonal", "identity"):
            for block in p.view(gates, c.hidden, -1):
                nn.init.xavier_uniform_(block)
        elif "bias" in name:
            if c.init in ("identity", "gaussian"):
                p.zero_()
            if c.cell == "lstm":
                forget = slice(c.hidden, 2 * c.hidden)  # PyTorch gate order: input, forget, cell, output
                p[forget] = c.forget_bias if "bias_ih" in name else 0.0


def bits_per_char(nats: float) -> float:
    return nats / math.log(2)


def sequence_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None, reduction="mean"):
    """Cross-entropy in nats over (batch, time) targets; ``mask`` drops padded positions."""
    loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="none")
    if mask is not None:
        loss = loss * mask.reshape(-1)
        return loss.sum() if reduction == "sum" else loss.sum() / mask.sum().clamp(min=1)
    return loss.sum() if reduction == "sum" else loss.mean()
