"""Sampling text from a character model: temperature, top-k, top-p, stop strings, batches.

:class:`SampleRun` generates ``num_samples`` continuations of one seed
together, as one batch through a :class:`~charnn.inference.Stepper`:

1. The seed (default: a newline) is read in one batched pass
   (``Stepper.prime``); its state is repeated for every sample.
2. Each step turns the logits into a distribution (``temperature``, then
   ``top_k``, then ``top_p``), draws one character per sample, and feeds the
   characters back one step (``Stepper.step_arrays``), reusing the state.
3. A sample ends after ``length`` characters or when its text ends with one of
   the ``stop`` strings (which is not part of the returned text). Finished
   samples leave the batch.

Randomness: sample ``i`` draws from its own generator seeded with
``random_seed + i``, exactly one uniform number per generated character, by
inverse-CDF sampling (drawn in blocks, which gives the same numbers). A sample's draws therefore do not depend on the other
samples, and sample ``i`` of a batch equals a single run with random seed
``random_seed + i``. On the CPU the loop runs in the native kernel
(:mod:`charnn.native`, ``precision`` auto/fp32/bf16), where a row's numbers
never depend on its batch: the equality is exact. On the NumPy fallback it
holds up to floating-point rounding: a batch multiplies its rows in one matrix
product, whose summation order differs slightly from the single row's
matrix-vector product (differences near 1e-7). Only when a draw falls within
that distance of a boundary between two characters' probability intervals
(about once in 10 million draws) does the sample take a different character,
and the texts then diverge. With the same random seed, batch size and
precision, a run repeats exactly, every time.

``temperature=0`` is greedy decoding (argmax); ``top_k=1`` is the same. The
unknown symbol (id 0) is never generated unless ``allow_unknown``.
"""

from __future__ import annotations

import math
import os
import random
import time
import warnings
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .errors import SEED_LIMIT, CharnnError, check_settings, is_integer, is_number, setting
from .inference import Stepper, blas_threads
from .native import PRECISIONS
from .vocab import UNK_ID, Vocabulary

DEFAULT_SEED = "\n"  # what generation starts from when no seed is given
DRAW_BLOCK = 256  # uniform numbers drawn per sample at a time
NATIVE_BLOCKS = (8, 32, 128, 512)  # characters per native-kernel call: small first (streaming starts at once), then larger
STREAM_BLOCK_SECONDS = 0.03  # when streaming, native calls stay this short, so text keeps flowing with large models


class UnknownCharacterWarning(UserWarning):
    """Seed (or scored) text holds characters the model's vocabulary lacks."""


@dataclass(frozen=True)
class SamplingOptions:
    """How to sample; every field is validated on construction (CharnnError)."""

    length: int = 200
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    num_samples: int = 1
    random_seed: int | None = None  # None: a fresh random one (reported in each Sample)
    allow_unknown: bool = False
    logprobs: bool = True  # track each sample's average log-probability
    precision: str = "auto"  # CPU generation kernel: auto (bf16 where the CPU has it), fp32 or bf16; see charnn.native

    def __post_init__(self):
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        object.__setattr__(self, "stop", stop)
        checks = [
            (is_integer(self.length) and self.length >= 0, "length", f"must be 0 or more, got {self.length!r}"),
            (is_number(self.temperature) and self.temperature >= 0 and math.isfinite(self.temperature), "temperature",
             f"must be 0 (greedy) or positive, got {self.temperature!r}"),
            (self.top_k is None or (is_integer(self.top_k) and self.top_k >= 1), "top_k",
             f"must be at least 1, got {self.top_k!r}"),
            (self.top_p is None or (is_number(self.top_p) and 0 < self.top_p <= 1), "top_p",
             f"must be in (0, 1], got {self.top_p!r}"),
            (is_integer(self.num_samples) and self.num_samples >= 1, "num_samples",
             f"must be at least 1, got {self.num_samples!r}"),
            (self.random_seed is None or (is_integer(self.random_seed) and 0 <= self.random_seed < SEED_LIMIT), "random_seed",
             f"must be an integer in [0, 2**63), got {self.random_seed!r}"),
            (all(isinstance(s, str) and s for s in stop), "stop", "strings must be non-empty"),
            (self.precision in PRECISIONS, "precision", f"must be one of {', '.join(PRECISIONS)}, got {self.precision!r}"),
        ]
        check_settings(checks)


@dataclass
class Sample:
    """One generated continuation (the seed is not included in ``text``)."""

    index: int
    random_seed: int
    text: str
    stop_reason: str  # "length" or "stop"
    stop: str | None = None  # the stop string that ended it
    avg_logprob: float | None = None  # mean natural-log probability per character of ``text`` (temperature 1)

    def to_dict(self) -> dict:
        return asdict(self)


def encode_text(vocab: Vocabulary, text: str, *, strict: bool = False, what: str = "seed", prefix: str = "") -> np.ndarray:
    """Ids of ``prefix + text``; characters of ``text`` outside the vocabulary warn (or, ``strict``, raise) and
    become unknown. ``prefix`` is charnn's own (the start-of-line prime, DEFAULT_SEED): never reported, as the
    caller did not write it, even where the model has no newline."""
    if not isinstance(text, str):
        raise CharnnError(f"the {what} must be a string, got {type(text).__name__}"
                          + ("; decode bytes first, e.g. data.decode('utf-8')" if isinstance(text, bytes) else ""))
    unknown = vocab.unknown_chars(text)
    if unknown:
        shown = ", ".join(repr(ch) for ch in unknown[:10]) + (", ..." if len(unknown) > 10 else "")
        if strict:
            raise CharnnError(f"the {what} has characters the model does not know: {shown}; remove them, or drop {setting('strict')}")
        warnings.warn(f"the {what} has characters the model does not know: {shown}; they read as the unknown symbol",
                      UnknownCharacterWarning, stacklevel=3)
    return vocab.encode(prefix + text).astype(np.int64)


def fresh_random_seed() -> int:
    return random.SystemRandom().randrange(2**31)


# -- turning logits into characters ---------------------------------------------------------------------
GREEDY_BELOW = 1e-6  # a temperature this low picks the likeliest character anyway (and 1/T would overflow float32 soon)
INVALID_SCORES = "the model produced invalid scores (NaN or infinite); the checkpoint is damaged or its training diverged"


SAMPLE_BYTES = 2048  # per sample besides its characters: its random generator, state rows, bookkeeping


def _check_fits_in_memory(o: SamplingOptions) -> None:
    """The samples are held in memory while they are made (8 bytes a character, 16 with log-probabilities):
    refuse at once what cannot fit in half of this machine's memory, rather than fail or be killed midway."""
    need = o.num_samples * (o.length * (16 if o.logprobs else 8) + SAMPLE_BYTES)
    try:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (AttributeError, ValueError, OSError):  # not a POSIX system: no limit known
        return
    if need > have:
        raise CharnnError(f"{o.num_samples:,} sample{'s' if o.num_samples > 1 else ''} of {o.length:,} characters need about {need / 2**30:,.1f} GiB "
                          f"while they are made, more than half this machine's memory ({have * 2 / 2**30:,.0f} GiB); "
                          f"ask for fewer characters ({setting('length')}) or samples ({setting('num_samples')})")


class Chooser:
    """Draws one character per row from logits, under the sampling options.

    Batch 1 and larger batches run the same arithmetic (float32 scores, a
    float64 cumulative sum, one uniform draw per row), so a row's choice does
    not depend on the batch it is in.
    """

    def __init__(self, options: SamplingOptions, vocab_size: int):
        self.o = options
        self.vocab_size = vocab_size
        self.greedy = options.temperature < GREEDY_BELOW
        self.inv_temperature = None if self.greedy or options.temperature == 1 else np.float32(1.0 / options.temperature)
        self.top_k = options.top_k if options.top_k is not None and options.top_k < vocab_size else None
        self.top_p = options.top_p if options.top_p is not None and options.top_p < 1 else None
        self.ban_unknown = not options.allow_unknown

    def distribution(self, logits: np.ndarray) -> np.ndarray:
        """Unnormalised probabilities (B, V) after temperature, top-k and top-p; overwrites ``logits`` (float32)."""
        z = logits
        if self.ban_unknown:
            z[:, UNK_ID] = -np.inf
        if self.inv_temperature is not None:
            np.multiply(z, self.inv_temperature, out=z)
        if self.top_k is not None:
            kth = np.partition(z, -self.top_k, axis=1)[:, -self.top_k, None]
            z[z < kth] = -np.inf
        np.subtract(z, z.max(axis=1, keepdims=True), out=z)
        p = np.exp(z, out=z)
        if self.top_p is not None:
            q = p / p.sum(axis=1, keepdims=True, dtype=np.float64)
            order = np.argsort(-q, axis=1, kind="stable")
            ranked = np.take_along_axis(q, order, axis=1)
            drop = (np.cumsum(ranked, axis=1) - ranked) >= self.top_p  # mass before it already reaches top_p
            np.put_along_axis(p, order, np.where(drop, np.float32(0), np.take_along_axis(p, order, axis=1)), axis=1)
        return p

    def choose(self, logits: np.ndarray, uniforms: np.ndarray | None) -> np.ndarray:
        """Character ids (B,) from float32 ``logits`` (B, V), which this overwrites.

        Temperature 0 takes the argmax; otherwise each row's uniform number in
        [0, 1) picks a character by inverse CDF.
        """
        if self.greedy:
            if self.ban_unknown:
                return logits[:, 1:].argmax(axis=1) + 1
            return logits.argmax(axis=1)
        p = self.distribution(logits)
        if len(p) == 1:  # the same arithmetic as below, without the batch machinery
            cdf = p[0].cumsum(dtype=np.float64)
            total = float(cdf[-1])
            if not total > 0:  # NaN fails this too
                raise CharnnError(INVALID_SCORES)
            i = int(cdf.searchsorted(float(uniforms[0]) * total, side="right"))
            if i >= self.vocab_size:  # u * total rounded up to total: the last character with probability
                i = int(np.flatnonzero(p[0])[-1])
            return np.array([i])
        cdf = p.cumsum(axis=1, dtype=np.float64)
        total = cdf[:, -1]
        if not (total > 0).all():
            raise CharnnError(INVALID_SCORES)
        ids = np.count_nonzero(cdf <= (uniforms * total)[:, None], axis=1)
        if ids.max() >= self.vocab_size:
            for row in np.flatnonzero(ids >= self.vocab_size):
                ids[row] = np.flatnonzero(p[row])[-1]
        return ids


def log_probs(logits: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Natural-log probability of ``ids`` under the raw model (temperature 1, no filtering), per row."""
    z = logits.astype(np.float64)
    m = z.max(axis=1)
    lse = m + np.log(np.exp(z - m[:, None]).sum(axis=1))
    return z[np.arange(len(ids)), ids] - lse


# -- the generation loop ------------------------------------------------------------------------------
class SampleRun:
    """Generate samples of one seed as a batch; iterate to stream, or call :meth:`run`.

    Iterating yields ``(sample_index, text_piece)`` as text becomes final: a
    piece that might start a stop string is held back until it is known not
    to. After the run, ``samples`` holds the :class:`Sample` list,
    ``elapsed`` the run's time in seconds and ``prime_seconds`` the part
    spent reading the seed.
    """

    def __init__(self, stepper: Stepper, vocab: Vocabulary, seed: str | None = None,
                 options: SamplingOptions | None = None, *, strict: bool = False):
        self.stepper, self.vocab = stepper, vocab
        self.options = o = options or SamplingOptions()
        if len(vocab) != stepper.vocab_size:
            raise CharnnError(f"the vocabulary ({len(vocab)}) does not match the model ({stepper.vocab_size})")
        _check_fits_in_memory(o)
        if seed is not None and not isinstance(seed, str):
            encode_text(vocab, seed)  # the same one-line error as any text that is not a string
        self.seed = seed or ""
        self.seed_ids = encode_text(vocab, self.seed, strict=strict, prefix="" if self.seed else DEFAULT_SEED)
        self.base_seed = o.random_seed if o.random_seed is not None else fresh_random_seed()
        self.random_seeds = [self.base_seed + i for i in range(o.num_samples)]
        self.stops = self._stop_ids(o.stop)
        self.samples: list[Sample] | None = None
        self.elapsed = 0.0  # seconds for the whole run, reading the seed included
        self.prime_seconds = 0.0  # of which reading the seed
        self.steps = 0
        self.engine: str | None = None  # what generated: native-bf16, native-fp32, numpy, torch or model

    def _stop_ids(self, stops: tuple[str, ...]) -> list[tuple[str, np.ndarray]]:
        usable = []
        for s in stops:
            missing = self.vocab.unknown_chars(s)
            if missing:
                warnings.warn(f"stop string {s!r} has characters the model never generates "
                              f"({', '.join(map(repr, missing))}); it cannot match", UnknownCharacterWarning, stacklevel=4)
                continue
            usable.append((s, self.vocab.encode(s).astype(np.intp)))
        return usable

    def __iter__(self):
        return self._generate(stream=True)

    def run(self) -> list[Sample]:
        """Generate without streaming; the samples."""
        for _ in self._generate(stream=False):
            pass
        return self.samples

    @property
    def chars_generated(self) -> int:
        return sum(len(s.text) for s in self.samples or [])

    def _prime(self):
        n = self.options.num_samples
        logits, state = self.stepper.prime(torch.as_tensor(self.seed_ids)[None])
        logits = logits.cpu().numpy().astype(np.float32)
        if n > 1:
            state = self.stepper.select(state, np.zeros(n, dtype=np.intp))
            logits = np.repeat(logits, n, axis=0)
        return logits, state

    def _generate(self, stream: bool):
        engine = self.stepper.native(self.options.precision, rows=self.options.num_samples) if self.options.length else None
        if engine is not None:
            yield from self._generate_native(engine, stream)
            return
        if self.options.precision == "bf16":
            raise CharnnError(f"{setting('precision', 'bf16')} needs the native CPU kernel, which is unavailable here "
                              f"({self.stepper.native_unavailable_reason()}); use {setting('precision', 'fp32')}")
        self.engine = "numpy" if self.stepper.backend == "numpy" else self.stepper.backend
        yield from self._generate_stepper(stream)

    def _generate_native(self, engine, stream: bool):
        """The loop in C (``charnn.native``), a block of characters per call; stops and streaming per block."""
        o = self.options
        length = o.length
        start = time.perf_counter()
        self.engine = f"native-{engine.precision}"
        c = Chooser(o, self.stepper.vocab_size)
        options = np.array([c.inv_temperature or 1.0, c.top_k or 0, c.top_p or 1.0, c.ban_unknown, c.greedy], dtype=np.float64)
        rngs, out, lps, end, hit, emitted, rows = self._run_arrays()
        logits, state = self._prime()
        self.prime_seconds = time.perf_counter() - start
        logits = np.ascontiguousarray(logits, dtype=np.float32)
        h, cs = engine.state_arrays(state)
        t, calls, per_char = 0, 0, 0.0
        while t < length:
            T = NATIVE_BLOCKS[min(calls, len(NATIVE_BLOCKS) - 1)]
            if stream and per_char > 0:  # a streamed block takes at most STREAM_BLOCK_SECONDS
                T = max(NATIVE_BLOCKS[0], min(T, int(STREAM_BLOCK_SECONDS / per_char)))
            T = min(T, length - t)
            calls += 1
            uniforms = None if c.greedy else np.stack([rngs[r].random(T) for r in rows], axis=1)
            began = time.perf_counter()
            ids, block_lps = engine.generate(logits, h, cs, T, uniforms, options, logprobs=lps is not None,
                                             step_last=t + T < length)
            per_char = (time.perf_counter() - began) / T
            out[t:t + T, rows] = ids
            if lps is not None:
                lps[t:t + T, rows] = block_lps
            self.steps += T if t + T < length else T - 1
            live = rows
            if self.stops:
                for tt in range(t, t + T):
                    keep = self._check_stops(out, tt, live, end, hit)
                    if keep is not None:
                        live = live[keep]
                        if not len(live):
                            break
            if stream:  # the block's characters, position by position, as the step loop would give them
                for tt in range(t, t + T):
                    yield from self._pieces(out, tt, rows, end, emitted)
            t += T
            if len(live) < len(rows):
                if not len(live):
                    break
                pos = np.flatnonzero(np.isin(rows, live))
                logits = np.ascontiguousarray(logits[pos])
                h, cs = np.ascontiguousarray(h[:, pos]), np.ascontiguousarray(cs[:, pos])
                rows = live
        yield from self._finish(stream, start, out, lps, end, hit, emitted)

    def _generate_stepper(self, stream: bool):
        o, stepper = self.options, self.stepper
        n, length = o.num_samples, o.length
        start = time.perf_counter()
        chooser = Chooser(o, stepper.vocab_size)
        rngs, out, lps, end, hit, emitted, rows = self._run_arrays()
        logits, state = self._prime() if length else (None, None)
        self.prime_seconds = time.perf_counter() - start
        draws = np.empty((n, DRAW_BLOCK))  # each sample's next uniform numbers, drawn a block at a time
        with blas_threads(1):  # large batches use several cores through the stepper's chunks instead
            for t in range(length):
                uniforms = None
                if o.temperature:
                    j = t % DRAW_BLOCK
                    if j == 0:  # the same stream as one draw per step: sample i's draws never depend on others
                        for r in rows:
                            draws[r] = rngs[r].random(DRAW_BLOCK)
                    uniforms = draws[rows, j]
                raw = logits.copy() if lps is not None else None
                ids = chooser.choose(logits, uniforms)
                if len(rows) == n:
                    out[t] = ids
                else:
                    out[t, rows] = ids
                if lps is not None:
                    lps[t, rows] = log_probs(raw, ids)
                keep = self._check_stops(out, t, rows, end, hit) if self.stops else None
                if stream:
                    yield from self._pieces(out, t, rows, end, emitted)
                if keep is not None:
                    rows, ids = rows[keep], ids[keep]
                    if not len(rows):
                        break
                    state = stepper.select(state, np.flatnonzero(keep))
                if t + 1 < length:
                    logits, state = stepper.step_arrays(ids, state)
                    self.steps += 1
        yield from self._finish(stream, start, out, lps, end, hit, emitted)

    def _run_arrays(self):
        """What both generation loops keep: each sample's generator, the ids (length, n), log-probs,
        where each sample's text ends, the stop string that ended it, how much was streamed, and the
        original sample index of each live batch row."""
        n, length = self.options.num_samples, self.options.length
        rngs = [np.random.default_rng(s) for s in self.random_seeds]
        lps = np.zeros((length, n)) if self.options.logprobs else None
        return rngs, np.zeros((length, n), dtype=np.intp), lps, np.full(n, length), [None] * n, [0] * n, np.arange(n)

    def _finish(self, stream: bool, start: float, out, lps, end, hit, emitted):
        """Stream the rest of the samples that ran to the length limit; record the samples and the time."""
        if stream:
            for r in range(len(end)):
                if end[r] > emitted[r]:
                    yield int(r), self._decode(out[emitted[r]:end[r], r])
        self.elapsed = time.perf_counter() - start
        self.samples = [self._sample(r, out, lps, end, hit) for r in range(len(end))]

    def _check_stops(self, out, t, rows, end, hit):
        """Mark samples whose text now ends with a stop string; the keep-mask of live rows (None: all live)."""
        stopped = np.zeros(len(rows), dtype=bool)
        for s, ids in self.stops:
            m = len(ids)
            if t + 1 >= m:
                match = (out[t + 1 - m:t + 1, rows] == ids[:, None]).all(axis=0) & ~stopped
                for pos in np.flatnonzero(match):
                    r = rows[pos]
                    end[r], hit[r] = t + 1 - m, s
                stopped |= match
        return ~stopped if stopped.any() else None

    def _held_back(self, out, t, r) -> int:
        """How many trailing characters of sample ``r`` could still begin a stop string."""
        hold = 0
        for _, ids in self.stops:
            for j in range(min(len(ids) - 1, t + 1), hold, -1):
                if (out[t + 1 - j:t + 1, r] == ids[:j]).all():
                    hold = j
                    break
        return hold

    def _pieces(self, out, t, rows, end, emitted):
        for r in rows:
            limit = end[r] if end[r] <= t else t + 1 - (self._held_back(out, t, r) if self.stops else 0)
            if limit > emitted[r]:
                yield int(r), self._decode(out[emitted[r]:limit, r])
                emitted[r] = limit

    def _decode(self, ids: np.ndarray) -> str:
        chars = self.vocab.chars
        return "".join([chars[i] for i in ids.tolist()])

    def _sample(self, r, out, lps, end, hit) -> Sample:
        e = int(end[r])
        avg = float(lps[:e, r].mean()) if lps is not None and e else None
        return Sample(index=r, random_seed=self.random_seeds[r], text=self._decode(out[:e, r]),
                      stop_reason="stop" if hit[r] is not None else "length", stop=hit[r], avg_logprob=avg)


def generate(stepper: Stepper, vocab: Vocabulary, seed: str | None = None, *, strict: bool = False,
             **options) -> list[Sample]:
    """Samples of ``seed``'s continuation; ``options`` are :class:`SamplingOptions` fields."""
    return SampleRun(stepper, vocab, seed, SamplingOptions(**options), strict=strict).run()
