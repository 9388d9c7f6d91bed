"""The native generation kernel: a C step and sampling loop for CPUs, compiled on first use.

At batch 1 a step of a small model is a few matrix-vector products, and
NumPy's per-call overhead and float32 weight traffic bound it near 80 us.
``generate.c`` runs the whole loop (step, temperature/top-k/top-p choice,
log-probabilities) in C, for many characters per call:

* each layer's hidden units are split into two fixed parts (every gate of its
  units per part), run by the calling thread and one spinning worker, so each
  core keeps half the weights in its own cache;
* with ``precision="bf16"`` the recurrent weights are bfloat16 and the products
  use the CPU's bf16 dot-product instructions with float32 accumulation, which
  is the arithmetic of PyTorch's bf16 autocast that charnn trains and
  validates in on CPUs; ``"fp32"`` keeps float32 weights (AVX-512 FMA, or
  plain C on CPUs without AVX-512).

A row's numbers never depend on the batch it is in or the number of threads.
The library is compiled with the system C compiler (``$CC`` or ``cc``) into
``$CHARNN_CACHE_DIR`` (default ``~/.cache/charnn``) once per source version;
without a compiler, or with ``CHARNN_NATIVE=0``, charnn uses the NumPy stepper
and says why in :func:`unavailable_reason`.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np

from ..errors import CharnnError

SOURCE = Path(__file__).with_name("generate.c")
CFLAGS = ["-O3", "-fPIC", "-shared", "-pthread", "-std=gnu11"]
CELL_CODES = {"lstm": 0, "gru": 1, "rnn": 2}
PRECISIONS = ("auto", "fp32", "bf16")
NPARTS = 2  # must match generate.c
PANEL = 64  # columns per weight panel, as generate.c's kernels read them
MAX_VOCAB = 4096  # must match generate.c's MAXV
MAX_LAYERS = 16
DEFAULT_ROWS = 256  # rows a generator is sized for unless asked for more

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_reason: str | None = None


def cache_dir() -> Path:
    base = os.environ.get("CHARNN_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "charnn")
    return Path(base)


def _library_path() -> Path:
    compiler = os.environ.get("CC", "cc")
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join([compiler, *CFLAGS, platform.machine(), sys.platform]).encode())
    return cache_dir() / f"charnn_generate_{key.hexdigest()[:16]}.so"


def _build(path: Path) -> None:
    """Compile generate.c into ``path`` atomically (a temporary file, then a rename)."""
    compiler = os.environ.get("CC", "cc")
    if shutil.which(compiler) is None:
        raise OSError(f"no C compiler ({compiler!r} not found)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.stem, suffix=".so.tmp", dir=path.parent)
    os.close(fd)
    try:
        done = subprocess.run([compiler, *CFLAGS, "-o", tmp, str(SOURCE), "-lm"], capture_output=True, text=True,
                              timeout=120)
        if done.returncode != 0:
            first = (done.stderr.strip().splitlines() or ["unknown error"])[0]
            raise OSError(f"the C compiler failed: {first}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def library() -> ctypes.CDLL | None:
    """The loaded kernel library (built on first use), or None when it cannot be had."""
    global _lib, _reason
    with _lock:
        if _lib is not None or _reason is not None:
            return _lib
        if os.environ.get("CHARNN_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
            _reason = "disabled by CHARNN_NATIVE=0"
            return None
        if platform.machine().lower() not in ("x86_64", "amd64"):
            _reason = f"the native kernel is written for x86-64, not {platform.machine()}"
            return None
        try:
            path = _library_path()
            if not path.exists():
                _build(path)
            lib = ctypes.CDLL(str(path))
        except (OSError, subprocess.SubprocessError) as e:
            _reason = str(e)
            return None
        _declare(lib)
        _lib = lib
        return lib


def unavailable_reason() -> str | None:
    """Why the native kernel is not in use (None when it is)."""
    library()
    return _reason


def _declare(lib: ctypes.CDLL) -> None:
    p, i = ctypes.c_void_p, ctypes.c_int
    lib.cn_cpu_features.restype = i
    lib.cn_create.argtypes = [p]
    lib.cn_create.restype = p
    lib.cn_set_part.argtypes = [p, i, i, i, p, p, p]
    lib.cn_set_head.argtypes = [p, p]
    lib.cn_destroy.argtypes = [p]
    lib.cn_step.argtypes = [p, i, p, p, p, p]
    lib.cn_step.restype = i
    lib.cn_generate.argtypes = [p, i, i, p, p, p, p, p, p, p, i]
    lib.cn_generate.restype = i


def supports_bf16() -> bool:
    lib = library()
    return bool(lib is not None and lib.cn_cpu_features() & 2)


def resolve_precision(precision: str) -> str:
    """``auto`` -> bf16 where the CPU has bf16 dot products, else fp32; bf16 elsewhere is an error."""
    if precision not in PRECISIONS:
        raise CharnnError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        return "bf16" if supports_bf16() else "fp32"
    if precision == "bf16" and not supports_bf16():
        raise CharnnError("bf16 generation needs a CPU with AVX512-BF16 and the native kernel; use --precision fp32")
    return precision


def _pad_cols(w: np.ndarray, n: int) -> np.ndarray:
    out = np.zeros((w.shape[0], n), dtype=np.float32)
    out[:, :w.shape[1]] = w
    return out


def _bf16_pairs(w: np.ndarray) -> np.ndarray:
    """(K, N) float32 -> (ceil(K/2), N, 2) bfloat16 bits, input rows interleaved in pairs, rounded to nearest even."""
    K, N = w.shape
    if K % 2:
        w = np.concatenate([w, np.zeros((1, N), dtype=np.float32)])
    u = np.ascontiguousarray(w, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return np.ascontiguousarray(rounded.reshape(-1, 2, N).transpose(0, 2, 1))


def _panels(w: np.ndarray) -> np.ndarray:
    """Columns in panels of PANEL, each stored whole (all its rows) before the next, so the kernel
    streams every panel contiguously; works on (K, N) floats and (K/2, N, 2) bf16 pairs alike."""
    return np.concatenate([np.ascontiguousarray(w[:, j:j + PANEL]).reshape(-1) for j in range(0, w.shape[1], PANEL)])


class NativeGenerator:
    """A frozen :class:`~charnn.inference.Stepper`'s weights in the C kernel's layout.

    :meth:`step` advances a batch one character; :meth:`generate` draws ``T``
    characters per row in one call. States are the stepper's
    :class:`~charnn.inference.StepState` (NumPy float32, layers x batch x hidden).
    """

    def __init__(self, stepper, precision: str = "auto", threads: int | None = None, max_rows: int = DEFAULT_ROWS):
        lib = library()
        if lib is None:
            raise CharnnError(f"the native kernel is unavailable: {_reason}")
        if not stepper.fast or stepper.ops.name != "numpy":
            raise CharnnError("the native kernel needs the NumPy stepper of a library cell (no gate slope or layer norm)")
        c = stepper.config
        if c.vocab_size > MAX_VOCAB or c.layers > MAX_LAYERS or stepper.hidden < NPARTS:
            raise CharnnError("the native kernel supports up to 4096 characters, 16 layers and 2+ hidden units")
        self.lib, self.stepper = lib, stepper
        self.precision = resolve_precision(precision)
        self.cell, self.layers, self.hidden, self.vocab_size = stepper.cell, stepper.layers, stepper.hidden, c.vocab_size
        self.max_rows = max_rows
        if threads is None:
            import torch  # noqa: PLC0415

            threads = min(NPARTS, os.cpu_count() or 1, torch.get_num_threads())
        self.threads = max(1, min(NPARTS, threads))
        self._keep: list[np.ndarray] = []  # the arrays C points into
        vp = -(-self.vocab_size // 16) * 16
        dims = np.array([CELL_CODES[self.cell], int(c.activation == "relu"), self.layers, self.hidden, self.vocab_size,
                         vp, int(self.precision == "bf16"), self.threads, max_rows], dtype=np.int32)
        self._ctx = lib.cn_create(dims.ctypes.data)
        if not self._ctx:
            raise CharnnError("the native kernel could not be set up for this model")
        self._load_weights(vp)

    def _mat(self, w: np.ndarray) -> tuple[int, int, int]:
        """Pad ``w`` (K, N) to N % 16 == 0, convert per precision; (pointer, K, padded N)."""
        n = -(-w.shape[1] // 16) * 16
        w = _pad_cols(w, n)
        k = w.shape[0]
        if self.precision == "bf16":
            w = _bf16_pairs(w)
            k = 2 * w.shape[0]
        w = _panels(w)
        self._keep.append(w)
        return w.ctypes.data, k, n  # k: rows as the kernel reads them (even for bf16 pairs)

    def _load_weights(self, vp: int) -> None:
        s, L = self.stepper, self.layers
        parts = s._get_parts(NPARTS)
        for p, part in enumerate(parts):
            units = part.units
            mats = (ctypes.c_void_p * (2 * L))()
            shapes = np.zeros(4 * L, dtype=np.int32)
            for k in range(L):
                if self.cell == "gru":
                    rec, inp = part.w_rec[k], part.w_in[k]
                elif k == 0:
                    rec, inp = part.w_rec[0], None
                else:
                    rec, inp = part.w_in[k], None
                ptr, kk, nn = self._mat(np.asarray(rec, dtype=np.float32))
                mats[2 * k], shapes[4 * k], shapes[4 * k + 1] = ptr, kk, nn
                if inp is not None:
                    ptr, kk, nn = self._mat(np.asarray(inp, dtype=np.float32))
                    mats[2 * k + 1], shapes[4 * k + 2], shapes[4 * k + 3] = ptr, kk, nn
            n0 = -(-part.table.shape[1] // 16) * 16
            table = _pad_cols(np.asarray(part.table, dtype=np.float32), n0)
            self._keep += [table, shapes, mats]
            self.lib.cn_set_part(self._ctx, p, units.start, units.stop - units.start, table.ctypes.data,
                                 ctypes.cast(mats, ctypes.c_void_p), shapes.ctypes.data)
        w_out = _panels(_pad_cols(np.asarray(s._w_out, dtype=np.float32), vp))
        self._keep.append(w_out)
        self.lib.cn_set_head(self._ctx, w_out.ctypes.data)

    def close(self) -> None:
        if getattr(self, "_ctx", None):
            self.lib.cn_destroy(self._ctx)
            self._ctx = None

    def __del__(self):
        self.close()

    # -- running -----------------------------------------------------------------------------------
    def state_arrays(self, state):
        """Copies of a StepState's arrays as the kernel takes them (h, and c or zeros), C-contiguous float32."""
        h = np.array(state.h, dtype=np.float32, order="C", copy=True)
        c = np.array(state.c, dtype=np.float32, order="C", copy=True) if state.c is not None else np.zeros_like(h)
        return h, c

    def _rows(self, batch: int) -> None:
        if not 1 <= batch <= self.max_rows:
            raise CharnnError(f"the native kernel runs 1 to {self.max_rows} rows at a time, got {batch}")

    def step(self, ids, state):
        """One character per row: logits (B, V) float32 and a new state (the input state is unchanged)."""
        from ..inference import StepState  # noqa: PLC0415

        ids = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
        self._rows(len(ids))
        if len(ids) != state.batch:
            raise CharnnError(f"step needs one id per state row ({state.batch}), got {len(ids)}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise CharnnError(f"character ids must lie in [0, {self.vocab_size}), got {ids.min()}..{ids.max()}")
        h, c = self.state_arrays(state)
        logits = np.empty((len(ids), self.vocab_size), dtype=np.float32)
        self.lib.cn_step(self._ctx, len(ids), ids.ctypes.data, h.ctypes.data, c.ctypes.data, logits.ctypes.data)
        return logits, StepState(h, c if self.cell == "lstm" else None)

    def generate(self, logits: np.ndarray, h: np.ndarray, c: np.ndarray, T: int, uniforms: np.ndarray | None,
                 options: np.ndarray, *, logprobs: bool, step_last: bool):
        """``T`` characters for each of ``B`` rows (``uniforms`` (T, B), or None for greedy), from the
        current ``logits`` (B, V) and state ``h``/``c`` (L, B, H), all advanced in place.
        ``options``: inv_temperature, top_k (0: off), top_p, ban_unknown, greedy. Ids (T, B), log-probs or None."""
        B = logits.shape[0]
        self._rows(B)
        ids = np.empty((T, B), dtype=np.int64)
        lps = np.empty((T, B), dtype=np.float64) if logprobs else None
        err = self.lib.cn_generate(self._ctx, B, T, h.ctypes.data, c.ctypes.data, logits.ctypes.data,
                                   None if uniforms is None else uniforms.ctypes.data, options.ctypes.data,
                                   ids.ctypes.data, None if lps is None else lps.ctypes.data, int(step_last))
        if err == -1:
            from ..sampling import INVALID_SCORES  # noqa: PLC0415

            raise CharnnError(INVALID_SCORES)
        if err:
            raise CharnnError(f"the native kernel refused the call (code {err})")
        return ids, lps

