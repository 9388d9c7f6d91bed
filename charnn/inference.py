"""Fast recurrent stepping for generation: one character per row per call.

:class:`Stepper` freezes a :class:`~charnn.model.CharRNN` into a form that
advances the recurrence cheaply: ``prime`` reads a whole text in one batched
pass, and ``step`` then adds one character per row, reusing the state.

Why it is fast at batch 1 (measurements in ``benchmarks/RESULTS.md``,
"Sampling speed"): a step of a small model is a few matrix-vector products,
and a textbook ``nn.LSTM`` call per character spends most of its time in
per-call framework work. The stepper

* folds the embedding, the first layer's input weights and every bias of the
  first layer into one table, so layer 0's input projection is a row lookup;
* concatenates each upper layer's input and recurrent weights (plus a bias
  row) into one pre-transposed matrix, so a layer is one matrix product;
* reorders the LSTM gates to (input, forget, output, cell) and halves the
  sigmoid rows, so one ``tanh`` over the whole gate block gives every gate
  (``sigmoid(x) = (1 + tanh(x / 2)) / 2``);
* folds a tied-weight projection into the output layer;
* on the CPU runs in NumPy on float32 arrays (about 0.5 us per operation
  against several us for a PyTorch operator call), into scratch buffers made
  once per batch size, with BLAS on one thread. Batches of ``PART_ROWS`` rows
  or more split every layer by hidden units (each part computes all gates of
  its units, so the cell math stays local) and run the parts on parallel
  threads (NumPy releases the GIL). The split depends on the batch size only,
  so the numbers never depend on the thread count (a multi-threaded BLAS
  rounds differently with it), and a busy machine slows a step down instead
  of stalling threads that spin while they wait for each other.

``prime`` on the CPU runs the fused kernels' own algorithm in NumPy: per
layer, one batched matrix product (a table lookup for layer 0) projects the
input of every position, and only the recurrent product runs position by
position. It needs no per-call kernel setup (about 0.5 ms for PyTorch's fused
LSTM on a one-character seed) and computes exactly what ``step`` computes.

On other devices the same arithmetic runs with PyTorch operators under
``torch.inference_mode`` and ``prime`` calls the model's fused kernel. Models
with charnn's own cell (gate slope or layer norm, ``config.uses_custom_cell``)
fall back to the model itself: ``prime`` is one model call, ``step`` one model
call per character, correct but slower.

``step`` never changes the state passed in: it returns a new one, so callers
may keep old states (caches, beam search); the returned state and logits are
the only arrays a step allocates. Scratch buffers are per thread, so threads
may share a stepper.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import glob
import math
import os
import threading
import time
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch

from .errors import CharnnError
from .model import CharRNN

SMALL_BATCH = 16  # kept for callers' thread policies; the stepper itself always runs BLAS on one thread
GATES = {"lstm": 4, "gru": 3, "rnn": 1}
PART_ROWS = 32  # batches of at least this many rows split each layer by hidden units over threads ...
MAX_PARTS = 4  # ... into batch // PART_ROWS parts, at most this many
PRIME_BLOCK = 256  # positions per block when priming on the NumPy backend


# -- the state --------------------------------------------------------------------------------------
@dataclass
class StepState:
    """Recurrent state of the fast path: ``h`` (and ``c`` for the LSTM), each (layers, batch, hidden).

    NumPy arrays on the CPU backend, tensors on the torch backend. Treat it as opaque.
    """

    h: object
    c: object = None

    @property
    def batch(self) -> int:
        return int(self.h.shape[1])


# -- array backends -----------------------------------------------------------------------------------
class _NumpyOps:
    """float32 NumPy arrays on the CPU."""

    name = "numpy"
    half = np.float32(0.5)

    def __init__(self, device):
        self.device = device

    @staticmethod
    def array(t: torch.Tensor):
        return np.ascontiguousarray(t.detach().to("cpu", torch.float32).numpy())

    @staticmethod
    def empty(shape):
        return np.empty(shape, dtype=np.float32)

    @staticmethod
    def ones(shape):
        return np.ones(shape, dtype=np.float32)

    @staticmethod
    def zeros(shape):
        return np.zeros(shape, dtype=np.float32)

    matmul = staticmethod(np.matmul)
    tanh = staticmethod(np.tanh)
    mul = staticmethod(np.multiply)
    add = staticmethod(np.add)
    sub = staticmethod(np.subtract)

    @staticmethod
    def relu(x):
        np.maximum(x, 0.0, out=x)

    @staticmethod
    def copy(dst, src):
        np.copyto(dst, src)

    @staticmethod
    def take(table, ids, out):
        np.take(table, ids, axis=0, out=out)

    @staticmethod
    def ids(ids) -> np.ndarray:
        if isinstance(ids, torch.Tensor):
            ids = ids.detach().cpu().numpy()
        return np.asarray(ids, dtype=np.intp)

    @staticmethod
    def rows(x, rows):
        return x[:, rows]

    @staticmethod
    def from_torch(t: torch.Tensor):
        return np.array(t.detach().to("cpu", torch.float32).numpy(), dtype=np.float32, order="C")

    @staticmethod
    def to_torch(a) -> torch.Tensor:
        return torch.from_numpy(a)

    @staticmethod
    def to_numpy(a) -> np.ndarray:
        return a


class _TorchOps:
    """float32 tensors on any PyTorch device (CUDA, MPS, or the CPU when asked)."""

    name = "torch"
    half = 0.5

    def __init__(self, device):
        self.device = torch.device(device)

    def array(self, t: torch.Tensor):
        return t.detach().to(self.device, torch.float32).contiguous().clone()

    def empty(self, shape):
        return torch.empty(shape, dtype=torch.float32, device=self.device)

    def ones(self, shape):
        return torch.ones(shape, dtype=torch.float32, device=self.device)

    def zeros(self, shape):
        return torch.zeros(shape, dtype=torch.float32, device=self.device)

    @staticmethod
    def matmul(a, b, out):
        return torch.mm(a, b, out=out)

    @staticmethod
    def tanh(x, out):
        return torch.tanh(x, out=out)

    @staticmethod
    def mul(a, b, out):
        return torch.mul(a, b, out=out)

    @staticmethod
    def add(a, b, out):
        return torch.add(a, b, out=out)

    @staticmethod
    def sub(a, b, out):
        return torch.sub(a, b, out=out)

    @staticmethod
    def relu(x):
        x.clamp_(min=0)

    @staticmethod
    def copy(dst, src):
        dst.copy_(src)

    @staticmethod
    def take(table, ids, out):
        torch.index_select(table, 0, ids, out=out)

    def ids(self, ids) -> torch.Tensor:
        return torch.as_tensor(ids, dtype=torch.long, device=self.device)

    def rows(self, x, rows):
        return x.index_select(1, torch.as_tensor(rows, dtype=torch.long, device=self.device))

    def from_torch(self, t: torch.Tensor):
        return t.detach().to(self.device, torch.float32).contiguous().clone()

    @staticmethod
    def to_torch(a) -> torch.Tensor:
        return a

    @staticmethod
    def to_numpy(a) -> np.ndarray:
        return a.cpu().numpy()


# -- BLAS threads ---------------------------------------------------------------------------------------
def _find_openblas_setter():
    """``set_num_threads`` of the OpenBLAS bundled with NumPy's wheels, or None (other builds)."""
    base = os.path.dirname(os.path.dirname(np.__file__))
    for pattern in ("numpy.libs/*openblas*", "numpy/.dylibs/*openblas*"):
        for path in glob.glob(os.path.join(base, pattern)):
            try:
                lib = ctypes.CDLL(path)
            except OSError:
                continue
            for name in ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads",
                         "openblas_set_num_threads64_", "openblas_set_num_threads"):
                setter = getattr(lib, name, None)
                getter = getattr(lib, name.replace("set_", "get_"), None)
                if setter is not None and getter is not None:
                    return setter, getter
    return None


_BLAS = None  # (setter, getter), False where NumPy's BLAS threads cannot be set
_BLAS_LOCK = threading.Lock()
_BLAS_USERS = 0
_BLAS_BEFORE = None


@contextlib.contextmanager
def blas_threads(n: int | None):
    """Run NumPy's BLAS on ``n`` threads inside the block (no-op where that cannot be controlled).

    The setting is process-wide: nested or concurrent blocks take the latest
    ``n``, and the thread count from before the first block returns when the
    last one ends.
    """
    global _BLAS, _BLAS_USERS, _BLAS_BEFORE
    if n is None:
        yield
        return
    with _BLAS_LOCK:
        if _BLAS is None:
            _BLAS = _find_openblas_setter() or False
        if _BLAS:
            if _BLAS_USERS == 0:
                _BLAS_BEFORE = _BLAS[1]()
            _BLAS_USERS += 1
            _BLAS[0](int(n))
    try:
        yield
    finally:
        if _BLAS:
            with _BLAS_LOCK:
                _BLAS_USERS -= 1
                if _BLAS_USERS == 0:
                    _BLAS[0](_BLAS_BEFORE)


_EXECUTOR = None


def _executor():
    """Worker threads for batch chunks (NumPy releases the GIL inside its kernels)."""
    global _EXECUTOR
    with _BLAS_LOCK:
        if _EXECUTOR is None:
            from concurrent.futures import ThreadPoolExecutor  # noqa: PLC0415

            _EXECUTOR = ThreadPoolExecutor(max_workers=max(1, (os.cpu_count() or 2) - 1), thread_name_prefix="charnn-step")
    return _EXECUTOR


# -- the stepper -------------------------------------------------------------------------------------------
class Stepper:
    """Advance a character model one step (or one primed text) at a time, without autograd.

    ``device``: where the arithmetic runs. The CPU uses the NumPy fast path;
    other devices use PyTorch operators. The stepper snapshots the model's
    weights at construction (later training of ``model`` does not affect it).
    """

    def __init__(self, model: CharRNN, device="cpu", *, backend: str | None = None):
        if not isinstance(model, CharRNN):
            raise CharnnError(f"Stepper needs a CharRNN, got {type(model).__name__}")
        self.device = torch.device(device)
        self.config = c = model.config
        self.model = copy.deepcopy(model).to(self.device, torch.float32).eval().requires_grad_(False)
        self.cell, self.layers, self.hidden = c.cell, c.layers, c.hidden
        self.fast = not c.uses_custom_cell
        if backend is None:
            backend = "numpy" if self.device.type == "cpu" else "torch"
        if backend not in ("numpy", "torch"):
            raise CharnnError(f"backend must be numpy or torch, got {backend!r}")
        if backend == "numpy" and self.device.type != "cpu":
            raise CharnnError("the numpy backend runs on the CPU only; use backend='torch' on other devices")
        self.ops = _NumpyOps(self.device) if backend == "numpy" else _TorchOps(self.device)
        self._local = threading.local()
        self._tuners: dict[int, _ThreadTuner] = {}
        self._native: dict = {}  # (precision, process id) -> charnn.native.NativeGenerator, made on first use
        if self.fast:
            with torch.no_grad():
                self._prepare_weights()

    def native(self, precision: str = "auto", rows: int = 1):
        """The C generation kernel (:mod:`charnn.native`) for this model and ``precision``, made once and
        kept; None where it cannot run (no compiler, not the NumPy fast path, or ``precision`` fp32/auto
        without it). Sized for at least ``rows`` rows."""
        from . import native as nat  # noqa: PLC0415

        if not self.fast or self.ops.name != "numpy" or nat.library() is None:
            return None
        precision = nat.resolve_precision(precision)
        key = (precision, os.getpid())  # a forked child has no copy of the parent's worker thread
        engine = self._native.get(key)
        if engine is None or engine.max_rows < rows:
            engine = self._native[key] = nat.NativeGenerator(self, precision, max_rows=max(nat.DEFAULT_ROWS, rows))
        return engine

    def native_unavailable_reason(self) -> str | None:
        from . import native as nat  # noqa: PLC0415

        if not self.fast:
            return "the model uses charnn's own cell (gate slope or layer norm)"
        if self.ops.name != "numpy":
            return f"the model runs on {self.device}, not the CPU"
        return nat.unavailable_reason()

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def backend(self) -> str:
        """``numpy`` or ``torch`` for the fast path, ``model`` for the generic fallback."""
        return self.ops.name if self.fast else "model"

    # -- weights -----------------------------------------------------------------------------------
    def _gate_order(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Row permutation into the stepper's gate order, and each row's pre-activation scale."""
        H = self.hidden
        if self.cell == "lstm":  # PyTorch (i, f, g, o) -> (i, f, o, g); sigmoid rows halved
            perm = torch.cat([torch.arange(0, 2 * H), torch.arange(3 * H, 4 * H), torch.arange(2 * H, 3 * H)])
            scale = torch.cat([torch.full((3 * H,), 0.5), torch.ones(H)])
        elif self.cell == "gru":  # (r, z, n); sigmoid rows halved
            perm = torch.arange(3 * H)
            scale = torch.cat([torch.full((2 * H,), 0.5), torch.ones(H)])
        else:
            perm, scale = torch.arange(H), torch.ones(H)
        return perm, scale

    def _prepare_weights(self) -> None:
        m, c, ops = self.model, self.config, self.ops
        rnn = m.rnn
        perm, scale = self._gate_order()
        H = self.hidden
        gru = self.cell == "gru"
        emb = m.embed.weight.detach().double().cpu()
        self._table = None
        self._w_in, self._w_rec = [], []  # per layer: input weights with bias row; recurrent weights
        for k in range(c.layers):
            w_ih = getattr(rnn, f"weight_ih_l{k}").detach().double().cpu()
            w_hh = getattr(rnn, f"weight_hh_l{k}").detach().double().cpu()
            b_ih = getattr(rnn, f"bias_ih_l{k}").detach().double().cpu()
            b_hh = getattr(rnn, f"bias_hh_l{k}").detach().double().cpu()
            if gru:  # r and z take both biases with the input; n's recurrent bias stays inside r * (...)
                b_in = b_ih + torch.cat([b_hh[: 2 * H], torch.zeros(H)])
                b_rec = torch.cat([torch.zeros(2 * H), b_hh[2 * H:]])
            else:
                b_in, b_rec = b_ih + b_hh, None
            w_ih, b_in = w_ih[perm] * scale[:, None], b_in[perm] * scale
            w_hh = w_hh[perm] * scale[:, None]
            if k == 0:  # embedding -> input projection -> bias: one row per character
                self._table = ops.array(emb @ w_ih.T + b_in)
                w_in = None
            else:
                w_in = torch.cat([w_ih.T, b_in[None]])  # (in + 1, G*H): the last input column is 1
            if gru:
                w_rec = torch.cat([w_hh.T, (b_rec[perm] * scale)[None]])  # (H + 1, 3H)
            elif k > 0:  # LSTM/RNN upper layers: one product over [x, h, 1]
                w_in = torch.cat([w_ih.T, w_hh.T, b_in[None]])
                w_rec = None
            else:
                w_rec = w_hh.T
            self._w_in.append(None if w_in is None else ops.array(w_in))
            self._w_rec.append(None if w_rec is None else ops.array(w_rec))
        w_out = m.head.weight.detach().double().cpu().T  # (out_dim, V)
        b_out = m.head.bias.detach().double().cpu()
        if m.proj is not None:  # logits = (h Wp^T + bp) Wo^T + bo: fold the projection in
            wp, bp = m.proj.weight.detach().double().cpu(), m.proj.bias.detach().double().cpu()
            b_out = bp @ w_out + b_out
            w_out = wp.T @ w_out
        self._w_out = ops.array(torch.cat([w_out, b_out[None]]))  # (H + 1, V)
        self._parts = {1: [_Part(None, self._table, self._w_in, self._w_rec)]}

    def _parts_for(self, batch: int) -> int:
        """How many slices of hidden units a step of ``batch`` rows is split into (never the thread count)."""
        if self.ops.name != "numpy" or batch < PART_ROWS:
            return 1
        return min(MAX_PARTS, batch // PART_ROWS, self.hidden)

    def _get_parts(self, n: int) -> list:
        """The weights split by hidden unit into ``n`` parts (each part: every gate of its units)."""
        parts = self._parts.get(n)
        if parts is None:
            H, G = self.hidden, GATES[self.cell]
            whole = self._parts[1][0]
            parts = []
            for units in np.array_split(np.arange(H), n):
                u = slice(int(units[0]), int(units[-1]) + 1)
                cols = np.concatenate([np.arange(j * H + u.start, j * H + u.stop) for j in range(G)])
                pick = (lambda w: None if w is None else np.ascontiguousarray(w[:, cols]))  # noqa: E731
                parts.append(_Part(u, pick(whole.table), [pick(w) for w in whole.w_in], [pick(w) for w in whole.w_rec]))
            self._parts[n] = parts
        return parts

    def _run_parts(self, n: int, fn, workers: int) -> None:
        """``fn(p)`` for every part, on ``workers`` threads."""
        if workers == 1:
            _run_all(fn, range(n))
            return
        groups = [range(i, n, workers) for i in range(workers)]
        futures = [_executor().submit(_run_all, fn, g) for g in groups[1:]]
        _run_all(fn, groups[0])
        for f in futures:
            f.result()

    # -- per-thread scratch buffers ---------------------------------------------------------------------
    def _scratch(self, batch: int, parts: int = 1, part: int = 0) -> SimpleNamespace:
        """Work buffers of this thread for one part of a ``batch``-row step (made once, with their views)."""
        cache = getattr(self._local, "buffers", None)
        if cache is None:
            cache = self._local.buffers = {}
        key = (batch, parts, part)
        buf = cache.get(key)
        if buf is None:
            if len(cache) > 16:
                cache.clear()
            units = self.hidden if parts == 1 else len(range(self.hidden)[self._get_parts(parts)[part].units])
            buf = cache[key] = self._new_scratch(batch, units)
        return buf

    def _new_scratch(self, batch: int, units: int) -> SimpleNamespace:
        """Gate buffers for ``units`` hidden units, plus the layer inputs every part reads."""
        ops, H, B, U = self.ops, self.hidden, batch, units
        G = GATES[self.cell]
        s = SimpleNamespace(g=ops.empty((B, G * U)), tmp=ops.empty((B, U)), out=ops.ones((B, H + 1)))
        s.out_h = s.out[:, :H]  # [h_top, 1] for the output layer
        if self.cell == "gru":
            s.gh = ops.empty((B, 3 * U))
            s.h1 = ops.ones((B, H + 1))  # [h, 1]
            s.x1 = ops.ones((B, H + 1))  # [x, 1] for upper layers
            s.h1_h, s.x1_x = s.h1[:, :H], s.x1[:, :H]
            s.rz, s.r, s.z, s.xn = s.g[:, :2 * U], s.g[:, :U], s.g[:, U:2 * U], s.g[:, 2 * U:]
            s.h_rz, s.h_n = s.gh[:, :2 * U], s.gh[:, 2 * U:]
            return s
        s.xh = ops.ones((B, 2 * H + 1))  # [x, h, 1] for upper layers
        s.xh_x, s.xh_h = s.xh[:, :H], s.xh[:, H:2 * H]
        s.rows = ops.empty((B, G * U))  # layer 0's table rows
        if self.cell == "lstm":
            s.tmp2 = ops.empty((B, U))
            s.sig = s.g[:, :3 * U]
            s.i, s.f, s.o, s.gg = (s.g[:, j * U:(j + 1) * U] for j in range(4))
        return s

    # -- public interface -----------------------------------------------------------------------------------
    def initial_state(self, batch: int):
        """Zero state for ``batch`` rows."""
        if batch < 1:
            raise CharnnError(f"batch must be at least 1, got {batch}")
        if not self.fast:
            return self.model.initial_state(batch, device=self.device, dtype=torch.float32)
        shape = (self.layers, batch, self.hidden)
        return StepState(self.ops.zeros(shape), self.ops.zeros(shape) if self.cell == "lstm" else None)

    def batch_size(self, state) -> int:
        if isinstance(state, StepState):
            return state.batch
        return int((state[0] if isinstance(state, tuple) else state).shape[1])

    def to_model_state(self, state):
        """The state as :meth:`CharRNN.forward` takes it: tensors (layers, batch, hidden) on the device."""
        if state is None or not isinstance(state, StepState):
            return state
        h = self.ops.to_torch(state.h).to(self.device)
        if self.cell == "lstm":
            return h, self.ops.to_torch(state.c).to(self.device)
        return h

    def from_model_state(self, state):
        """The inverse of :meth:`to_model_state` (copies)."""
        if state is None or not self.fast:
            return state
        if self.cell == "lstm":
            h, c = state
            return StepState(self.ops.from_torch(h), self.ops.from_torch(c))
        return StepState(self.ops.from_torch(state))

    def prime(self, ids: torch.Tensor, state=None) -> tuple[torch.Tensor, object]:
        """Read ``ids`` (B, T) in one batched pass; logits of the last position (B, V) float32 and the state."""
        ids = torch.as_tensor(ids, dtype=torch.long)
        if ids.dim() != 2 or ids.shape[1] < 1:
            raise CharnnError(f"prime needs ids of shape (batch, time) with time >= 1, got {tuple(ids.shape)}")
        if state is not None and self.batch_size(state) != ids.shape[0]:
            raise CharnnError(f"prime got {ids.shape[0]} rows of ids for a state of {self.batch_size(state)} rows")
        if self.fast and self.ops.name == "numpy":
            logits, new = self.prime_arrays(ids.numpy(), state)
            return torch.from_numpy(logits), new
        ids = ids.to(self.device)
        with torch.inference_mode():
            out, new = self.model.encode(ids, self.to_model_state(state))
            logits = self.model.decode(out[:, -1]).float()
            if self.fast:
                new = self.from_model_state(new)
            return logits.clone(), new

    def prime_arrays(self, ids: np.ndarray, state=None):
        """:meth:`prime` on the NumPy backend: the fused kernels' algorithm, layer by layer.

        Each layer's input projection for every position is one batched
        matrix product (a table lookup for layer 0); only the recurrent
        product runs position by position. Long texts go in blocks of
        ``PRIME_BLOCK`` positions to bound memory.
        """
        ids = np.asarray(ids, dtype=np.intp)
        if state is None:
            state = self.initial_state(ids.shape[0])
        with blas_threads(1):
            for a in range(0, ids.shape[1], PRIME_BLOCK):
                top, state = self._prime_block(ids[:, a:a + PRIME_BLOCK], state)
        s = self._scratch(ids.shape[0])
        self.ops.copy(s.out_h, top)
        logits = self.ops.empty((ids.shape[0], self.vocab_size))
        self.ops.matmul(s.out, self._w_out, out=logits)
        return logits, state

    def _prime_block(self, ids: np.ndarray, state: StepState):
        """Run every layer over ``ids`` (B, T); the top layer's last output and the new state."""
        B, T = ids.shape
        H, L = self.hidden, self.layers
        s = self._scratch(B)
        h_new = np.empty((L, B, H), dtype=np.float32)
        c_new = np.empty((L, B, H), dtype=np.float32) if self.cell == "lstm" else None
        seq = None  # (T, B, H): the current layer's outputs
        for k in range(L):
            if k == 0:
                x = self._table[ids.T]  # (T, B, G*H): input projections of every position
            else:
                w = self._w_in[k]  # [W_ih; W_hh; b] (LSTM/RNN) or [W_ih; b] (GRU)
                x = seq.reshape(T * B, H) @ w[:H]
                x += w[-1]
                x = x.reshape(T, B, -1)
            w_rec = self._w_rec[0] if k == 0 else (self._w_rec[k] if self.cell == "gru" else self._w_in[k][H:2 * H])
            seq = np.empty((T, B, H), dtype=np.float32)
            h, c = state.h[k], None if state.c is None else state.c[k]
            for t in range(T):
                h, c = self._recur(s, x[t], w_rec, h, c, seq[t])
            h_new[k] = h
            if c_new is not None:
                c_new[k] = c
        return seq[-1], StepState(h_new, c_new)

    def _recur(self, s, x_t, w_rec, h, c, h_out):
        """One position of one layer: x_t holds its input projection (biases folded); writes h_out."""
        mm, add = np.matmul, np.add
        if self.cell == "gru":
            self.ops.copy(s.h1_h, h)
            mm(s.h1, w_rec, out=s.gh)
            np.copyto(s.g, x_t)
            self._gru_gates(s, h, h_out)
            return h_out, None
        g = s.g
        mm(h, w_rec, out=g)
        add(g, x_t, out=g)
        if self.cell == "lstm":
            c_out = np.empty_like(s.tmp)
            self._lstm_cell(s, c, c_out, h_out)
            return h_out, c_out
        self._rnn_act(g, h_out)
        return h_out, None

    def step(self, ids: torch.Tensor, state) -> tuple[torch.Tensor, object]:
        """Advance every row by one character ``ids`` (B,); logits (B, V) float32 and the new state."""
        if state is None:
            state = self.initial_state(len(ids))
        if not self.fast:
            return self._model_step(ids, state)
        logits, new = self.step_arrays(ids, state)
        return self.ops.to_torch(logits), new

    def step_arrays(self, ids, state):
        """:meth:`step` on the backend's arrays (NumPy on the CPU): what the samplers' inner loop calls."""
        if not self.fast:
            logits, new = self._model_step(ids, state)
            return logits.cpu().numpy() if self.ops.name == "numpy" else logits, new
        ids = self.ops.ids(ids)
        if ids.ndim != 1 or ids.shape[0] != state.batch:
            raise CharnnError(f"step needs one id per state row ({state.batch}), got shape {tuple(ids.shape)}")
        if self.ops.name == "torch":
            with torch.inference_mode():
                return self._fast_step(ids, state)
        if _BLAS_USERS:  # inside blas_threads(...): the caller chose
            return self._fast_step(ids, state)
        with blas_threads(1):
            return self._fast_step(ids, state)

    def select(self, state, rows):
        """The state of ``rows`` (a 1-D index: restrict, reorder or repeat rows; beam search)."""
        if isinstance(rows, torch.Tensor):
            rows = rows.detach().cpu()
        rows_np = np.asarray(rows, dtype=np.intp).reshape(-1)
        if isinstance(state, StepState):
            pick = (lambda a: self.ops.rows(a, rows_np))
            return StepState(pick(state.h), None if state.c is None else pick(state.c))
        index = torch.as_tensor(rows_np, dtype=torch.long)
        if isinstance(state, tuple):
            return tuple(s.index_select(1, index.to(s.device)) for s in state)
        return state.index_select(1, index.to(state.device))

    # -- implementations --------------------------------------------------------------------------------------
    def _model_step(self, ids, state):
        """Generic path: the model itself, one time step (charnn's own cells)."""
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.device)
        with torch.inference_mode():
            logits, new = self.model(ids[:, None], state)
            return logits[:, 0].float().clone(), new

    def _new_outputs(self, B: int):
        L, H, ops = self.layers, self.hidden, self.ops
        return ops.empty((L, B, H)), ops.empty((L, B, H)) if self.cell == "lstm" else None, ops.empty((B, self.vocab_size))

    def _fast_step(self, ids, state: StepState):
        """One step of every row. Large batches run each layer in parts (slices of hidden units) on
        several threads: BLAS stays on one thread, and the split depends on the batch size only, so
        the numbers do not depend on how many cores take part."""
        ops, L, B = self.ops, self.layers, state.batch
        n = self._parts_for(B)
        parts = self._get_parts(n)
        shared = self._scratch(B)
        h_new, c_new, logits = self._new_outputs(B)
        if n > 1:
            tuner = self._tuners.get(n)
            if tuner is None:
                tuner = self._tuners[n] = _ThreadTuner([1, min(n, max(1, torch.get_num_threads()))])
            workers, start = tuner.pick(), time.perf_counter()
        for k in range(L):
            self._layer_inputs(k, state, h_new, shared)
            if n == 1:
                self._part_layer(parts[0], shared, k, ids, state, h_new, c_new)
            else:
                self._run_parts(n, lambda p: self._part_layer(  # noqa: B023 (run before k changes)
                    parts[p], self._scratch(B, n, p), k, ids, state, h_new, c_new, shared), workers)
        if n > 1:
            tuner.record(workers, time.perf_counter() - start)
        ops.copy(shared.out_h, h_new[L - 1])
        ops.matmul(shared.out, self._w_out, out=logits)
        return logits, StepState(h_new, c_new)

    def _layer_inputs(self, k, state, h_new, shared) -> None:
        """Fill the input buffers that every part of layer ``k`` reads."""
        copy = self.ops.copy
        if self.cell == "gru":
            copy(shared.h1_h, state.h[k])
            if k:
                copy(shared.x1_x, h_new[k - 1])
        elif k:
            copy(shared.xh_x, h_new[k - 1])
            copy(shared.xh_h, state.h[k])

    def _part_layer(self, part, s, k, ids, state, h_new, c_new, shared=None) -> None:
        """Layer ``k`` for the hidden units of ``part``, with its scratch ``s``."""
        ops = self.ops
        shared = shared or s
        u = part.units
        view = (lambda a: a) if u is None else (lambda a: a[:, u])  # noqa: E731
        if self.cell == "gru":
            if k == 0:
                ops.take(part.table, ids, out=s.g)
            else:
                ops.matmul(shared.x1, part.w_in[k], out=s.g)
            ops.matmul(shared.h1, part.w_rec[k], out=s.gh)
            self._gru_gates(s, view(state.h[k]), view(h_new[k]))
            return
        g = s.g
        if k == 0:  # h W_hh + the character's table row
            ops.matmul(state.h[0], part.w_rec[0], out=g)
            if len(ids) == 1:
                ops.add(g, part.table[int(ids[0])], out=g)  # a view of the row: no gather needed
            else:
                ops.take(part.table, ids, out=s.rows)
                ops.add(g, s.rows, out=g)
        else:  # [x, h, 1] W
            ops.matmul(shared.xh, part.w_in[k], out=g)
        if self.cell == "lstm":
            self._lstm_cell(s, view(state.c[k]), view(c_new[k]), view(h_new[k]))
        else:
            self._rnn_act(g, view(h_new[k]))

    def _lstm_cell(self, s, c_old, c_new, h_new) -> None:
        """``s.g`` holds the [i/2, f/2, o/2, g] pre-activations; writes the new c and h."""
        ops = self.ops
        tanh, mul, add, half = ops.tanh, ops.mul, ops.add, ops.half
        tanh(s.g, out=s.g)
        mul(s.sig, half, out=s.sig)  # sigmoid(x) = (1 + tanh(x / 2)) / 2
        add(s.sig, half, out=s.sig)
        mul(s.f, c_old, out=c_new)
        mul(s.i, s.gg, out=s.tmp2)
        add(c_new, s.tmp2, out=c_new)
        tanh(c_new, out=s.tmp)
        mul(s.o, s.tmp, out=h_new)

    def _rnn_act(self, g, h_new) -> None:
        if self.config.activation == "relu":
            self.ops.copy(h_new, g)
            self.ops.relu(h_new)
        else:
            self.ops.tanh(g, out=h_new)

    def _gru_gates(self, s, h_old, out) -> None:
        """``s.g`` holds the input part [r/2, z/2, n], ``s.gh`` the recurrent part; writes the new h."""
        ops = self.ops
        mul, add, tanh, half = ops.mul, ops.add, ops.tanh, ops.half
        add(s.rz, s.h_rz, out=s.rz)
        tanh(s.rz, out=s.rz)
        mul(s.rz, half, out=s.rz)  # r and z: sigmoid via tanh
        add(s.rz, half, out=s.rz)
        mul(s.r, s.h_n, out=s.tmp)  # r * (W_hn h + b_hn)
        add(s.tmp, s.xn, out=s.tmp)
        tanh(s.tmp, out=s.tmp)  # n
        ops.sub(h_old, s.tmp, out=out)
        mul(s.z, out, out=out)  # z * (h - n)
        add(out, s.tmp, out=out)  # n + z * (h - n)


@dataclass
class _Part:
    """Weights for a slice of hidden units (``units`` None: all of them), every gate of each unit."""

    units: slice | None
    table: object
    w_in: list
    w_rec: list


class _ThreadTuner:
    """Runs a split step's parts on one thread or on several, whichever the latest timings favour.

    Every ``EVERY`` steps it times ``PROBE`` steps with each option, then keeps
    the faster: several threads win on an idle machine, one thread when other
    work holds the cores (waiting threads then wait for the scheduler). The
    parts and their arithmetic are the same either way, so this choice never
    changes a result.
    """

    PROBE, EVERY = 3, 256

    def __init__(self, options: list[int]):
        self.options = sorted(set(options))
        self.best = self.options[-1]
        self.calls = 0
        self.times: dict[int, float] = {}

    def pick(self) -> int:
        phase = self.calls % self.EVERY
        self.calls += 1
        if phase < self.PROBE * len(self.options):
            return self.options[phase // self.PROBE]
        return self.best

    def record(self, workers: int, seconds: float) -> None:
        phase = (self.calls - 1) % self.EVERY
        probes = self.PROBE * len(self.options)
        if phase < probes:
            self.times[workers] = min(seconds, self.times.get(workers, math.inf))
            if phase == probes - 1:
                self.best = min(self.times, key=self.times.get)
                self.times = {}


def _run_all(fn, indices) -> None:
    for i in indices:
        fn(i)
