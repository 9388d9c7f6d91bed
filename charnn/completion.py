"""Autocomplete: a trained character model as a predictive keyboard.

:class:`Completer` proposes the ``k`` most likely continuations of a text::

    from charnn import Completer
    completer = Completer("checkpoints/shakespeare")
    completer.suggest("To be or no", k=3)                  # the rest of the word (or " next" word)
    completer.suggest("To be or not ", mode="phrase")      # up to the next punctuation mark
    completer.suggest("To be, or not to be", mode="line")  # to the end of the line

Suggestions come from a beam search over characters: every live beam advances
one character in a single batched recurrent step, hypotheses end at the mode's
boundary, and they are ranked by length-normalised log-probability.

Reading the text is incremental. The recurrent state after a text is kept in
a bounded LRU cache keyed by the text, so typing one more character costs one
recurrent step, and an edit or a backspace restarts from the state of the
longest cached prefix. Long documents are read from a window of at most
``context_chars`` characters that starts at a multiple of ``context_chars // 2``
(so the window, and with it the cache, moves only every half window).

A Completer is thread-safe and never reloads its model, so one instance can
serve many requests at once.
"""

from __future__ import annotations

import heapq
import math
import operator
import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import CharnnError, check_settings, is_integer, is_number
from .inference import SMALL_BATCH, Stepper, blas_threads

MODES = ("word", "phrase", "line")
PHRASE_END = ".,;:!?"  # phrase mode ends after one of these (included in the suggestion)
EMPTY_TEXT = "\n"  # an empty text is read as the start of a line


def is_word_char(ch: str) -> bool:
    """Letters, digits, underscore and apostrophe make up words."""
    return ch.isalnum() or ch in "_'"


@dataclass(frozen=True)
class Suggestion:
    """A proposed continuation of the text.

    ``text`` is what to insert after the text; ``probability`` is the model's
    probability of exactly that continuation followed by the mode's boundary
    (without the boundary when ``complete`` is False, i.e. the suggestion was
    cut at ``max_chars``); ``score`` is the length-normalised log-probability
    the suggestions are ranked by.
    """

    text: str
    probability: float
    score: float
    complete: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


# -- mode rules ------------------------------------------------------------------------------------
@dataclass
class _ModeRules:
    """Per-phase character masks of one mode, over the vocabulary.

    A beam in phase ``p`` may continue with the characters in ``cont[p]``
    (moving to phase ``next[p, c]``), end before a character of ``stop[p]``
    (not part of the suggestion) or end with a character of ``end_with[p]``
    (part of the suggestion).
    """

    cont: np.ndarray  # (P, V) bool
    stop: np.ndarray  # (P, V) bool
    end_with: np.ndarray  # (P, V) bool
    next: np.ndarray  # (P, V) int

    def __post_init__(self):
        self.stops = self.stop.any(1).tolist()  # per phase: can a beam end here?
        self.ends_with = self.end_with.any(1).tolist()


# word-mode phases: at the start (more of the typed word, or a space and the next word), after a space, inside a word
_LEAD, _NEED_WORD, _IN_WORD = 0, 1, 2


def _mode_rules(chars: list[str]) -> dict[str, _ModeRules]:
    """Character classes of the vocabulary turned into each mode's masks."""
    known = np.arange(len(chars)) > 0  # id 0, the unknown symbol, is never proposed
    word = np.array([is_word_char(c) for c in chars]) & known
    space = np.array([c == " " for c in chars])
    newline = np.array([c == "\n" for c in chars])
    punct = np.array([c in PHRASE_END for c in chars])
    none = np.zeros_like(known)
    single = np.zeros((1, len(chars)), dtype=np.int64)
    word_next = np.full((3, len(chars)), _IN_WORD, dtype=np.int64)
    word_next[_LEAD, space] = _NEED_WORD
    return {
        "word": _ModeRules(cont=np.stack([word | space, word, word]), stop=np.stack([none, none, known & ~word]),
                           end_with=np.stack([none, none, none]), next=word_next),
        "phrase": _ModeRules(cont=(known & ~punct & ~newline)[None], stop=newline[None], end_with=punct[None],
                             next=single),
        "line": _ModeRules(cont=(known & ~newline)[None], stop=newline[None], end_with=none[None], next=single),
    }


def _start_phase(mode: str, text: str) -> int:
    """Word mode after a space: a word. Otherwise the rest of the word typed so far or, if it is already
    complete (or after punctuation), a space and the next word."""
    if mode != "word":
        return 0
    return _NEED_WORD if not text or text[-1].isspace() else _LEAD


# -- the state cache ---------------------------------------------------------------------------
# The library's own bounds on suggest() (the server sets tighter ones of its own).
K_LIMIT = 100  # the beam batch is at least k rows
MAX_CHARS_LIMIT = 1000


def _bounded_int(name: str, value, most: int) -> int:
    """``value`` as an int in [1, most] (any integral type but bool), or a CharnnError."""
    try:
        if isinstance(value, bool):
            raise TypeError
        value = operator.index(value)
    except TypeError:
        raise CharnnError(f"{name} must be an integer from 1 to {most}, got {value!r}") from None
    if not 1 <= value <= most:
        raise CharnnError(f"{name} must be an integer from 1 to {most}, got {value!r}")
    return value


class StateCache:
    """A bounded LRU map from a text to the model's (state, next-char logits) after reading it."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise CharnnError(f"cache_size must be at least 1, got {capacity}")
        self.capacity = capacity
        self._items: OrderedDict[str, tuple[Any, torch.Tensor]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, text: str):
        item = self._items.get(text)
        if item is not None:
            self._items.move_to_end(text)
        return item

    def put(self, text: str, item) -> None:
        self._items[text] = item
        self._items.move_to_end(text)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def longest_prefix(self, text: str) -> tuple[str, Any]:
        """The longest cached text that ``text`` starts with, and its item (``("", None)`` if none)."""
        best, item = "", None
        for key in self._items:
            if len(best) < len(key) <= len(text) and text.startswith(key):
                best, item = key, self._items[key]
        if item is not None:
            self._items.move_to_end(best)
        return best, item


def _logaddexp(a: float, b: float) -> float:
    hi, lo = max(a, b), min(a, b)
    return hi + math.log1p(math.exp(lo - hi))


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(1, keepdims=True)
    return x - np.log(np.exp(x).sum(1, keepdims=True))


def _logsumexp(x: np.ndarray) -> np.ndarray:
    """Row-wise log-sum-exp that is -inf for rows of -inf."""
    top = x.max(1, keepdims=True)
    safe = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        return (safe + np.log(np.exp(x - safe).sum(1, keepdims=True)))[:, 0]


def _top(x: np.ndarray, n: int) -> np.ndarray:
    """Column indices of the ``n`` largest entries of each row, best first (ties: lower index first)."""
    n = min(n, x.shape[1])
    part = np.argpartition(-x, n - 1, axis=1)[:, :n] if n < x.shape[1] else np.tile(np.arange(x.shape[1]), (len(x), 1))
    order = np.lexsort((part, -np.take_along_axis(x, part, 1)), axis=1)
    return np.take_along_axis(part, order, 1)


def _top1d(x: np.ndarray, n: int) -> np.ndarray:
    """Indices of the ``n`` largest entries of ``x``, best first (ties: lower index first)."""
    if n < len(x):
        part = np.argpartition(-x, n - 1)[:n]
        part.sort()  # equal values keep index order through the stable sort below
    else:
        part = np.arange(len(x))
    return part[np.argsort(-x[part], kind="stable")]


def _resolve_model(model_or_path, vocab, device):
    """(CharRNN, Vocabulary) from a path, a loaded language model or a bare CharRNN plus its vocabulary."""
    if model_or_path is None or isinstance(model_or_path, (str, Path)):
        from .lm import load_language_model  # noqa: PLC0415

        model, ck = load_language_model(model_or_path, device=device)
        return model, ck.vocab
    if hasattr(model_or_path, "model") and hasattr(model_or_path, "vocab"):  # charnn.load(...)
        return model_or_path.model, model_or_path.vocab
    if isinstance(model_or_path, torch.nn.Module):
        if vocab is None:
            raise CharnnError("Completer(model) needs the model's vocabulary: Completer(model, vocab=vocab)")
        return model_or_path, vocab
    raise CharnnError(f"Completer needs a checkpoint path or a trained model, got {type(model_or_path).__name__}")


class Completer:
    """Word, phrase and line completions from a character language model.

    ``model_or_path``: a run or checkpoint directory (None: the latest run), a
    model returned by ``charnn.load``, or a ``CharRNN`` with ``vocab=``.
    ``beam_width`` beams advance together; ``length_penalty`` is the exponent
    alpha of the ranking score ``log p / len ** alpha`` (0 ranks by probability,
    1 by mean log-probability per character).
    """

    def __init__(self, model_or_path=None, *, vocab=None, device: str = "cpu", beam_width: int = 8,
                 length_penalty: float = 0.5, context_chars: int = 1024, cache_size: int = 512,
                 checkpoint_every: int = 64):
        check_settings([  # the command line has flags for the first two only (the others: their Python names)
            (is_integer(beam_width) and beam_width >= 1, "beam_width", f"must be an integer of at least 1, got {beam_width!r}"),
            (is_number(length_penalty) and 0 <= length_penalty < math.inf, "length_penalty",
             f"must be a finite number of 0 or more, got {length_penalty!r}"),
            (is_integer(context_chars) and context_chars >= 2, None,
             f"context_chars must be an integer of at least 2, got {context_chars!r}"),
            (is_integer(cache_size) and cache_size >= 1, None,
             f"cache_size must be an integer of at least 1, got {cache_size!r}"),
            (is_integer(checkpoint_every) and checkpoint_every >= 1, None,
             f"checkpoint_every must be an integer of at least 1, got {checkpoint_every!r}"),
        ])
        self.model, self.vocab = _resolve_model(model_or_path, vocab, device)
        self.device = next(self.model.parameters()).device
        shared = getattr(model_or_path, "stepper", None)  # a charnn.load(...) model's stepper is thread-safe: share it
        self.stepper = shared if shared is not None else Stepper(self.model, device=self.device)
        self.beam_width, self.length_penalty = beam_width, length_penalty
        self.context_chars, self.checkpoint_every = context_chars, checkpoint_every
        self._stride = max(1, context_chars // 2)
        self._chars = self.vocab.chars
        self._rules = _mode_rules(self._chars)
        self._cache = StateCache(cache_size)
        self._lock = threading.Lock()
        self.chars_read = 0  # characters fed to the model so far (one per recurrent step)

    # -- reading the text ----------------------------------------------------------------------
    def context_start(self, length: int) -> int:
        """Where the window read for a text of ``length`` characters starts.

        The last ``context_chars`` characters at most, from a multiple of half
        the window, so that typing on moves the window only every half window.
        """
        excess = length - self.context_chars
        return 0 if excess <= 0 else -(-excess // self._stride) * self._stride

    def _window(self, text: str) -> str:
        window = text[self.context_start(len(text)):]
        return window or EMPTY_TEXT

    def _read(self, window: str):
        """(state, logits) after ``window``, from the longest cached prefix on.

        The lock guards only the cache: the model steps outside it (the stepper
        keeps per-thread scratch buffers), so one client's long cold read never
        stalls the keystrokes of the others.
        """
        with self._lock:
            hit = self._cache.get(window)
            if hit is not None:
                return hit
            base, item = window[:-1], self._cache.get(window[:-1])
            if item is None:
                base, item = self._cache.longest_prefix(window)
        state = item[0] if item is not None else None
        rest = window[len(base):]
        ids = torch.as_tensor(self.vocab.encode(rest).astype("int64"), device=self.device)
        if len(rest) == 1 and state is not None:
            logits, state = self.stepper.step(ids, state)
            item = (state, logits)
        else:
            item = self._prime(base, rest, ids, state)
        with self._lock:
            self.chars_read += len(rest)
            self._cache.put(window, item)
        return item

    def _prime(self, base: str, rest: str, ids: torch.Tensor, state):
        """Read ``rest`` (``ids``) after ``base`` in batched passes, caching the state at every checkpoint position."""
        every, start = self.checkpoint_every, 0
        while True:
            end = min(len(ids), ((len(base) + start) // every + 1) * every - len(base))
            logits, state = self.stepper.prime(ids[None, start:end], state)
            if end == len(ids):
                return state, logits
            with self._lock:
                self._cache.put(base + rest[:end], (state, logits))
            start = end

    def next_char_probs(self, text: str) -> torch.Tensor:
        """The model's distribution (vocab_size,) over the character after ``text``."""
        if not isinstance(text, str):
            raise CharnnError(f"text must be a string, got {type(text).__name__}")
        _, logits = self._read(self._window(text))
        return torch.softmax(logits[0].float(), -1)

    # -- suggesting ------------------------------------------------------------------------------
    def suggest(self, text: str, k: int = 3, mode: str = "word", max_chars: int = 32) -> list[Suggestion]:
        """The ``k`` best continuations of ``text``, best first.

        ``word``: the rest of the current word, or a space and the next
        word when the typed word is already complete (or after punctuation),
        or the next word after a space; ``phrase``: up to and including the next ``.,;:!?`` (or to the
        line end); ``line``: to the end of the line. Suggestions are at most
        ``max_chars`` long; fewer than ``k`` come back when the model sees
        fewer plausible ones.
        """
        if not isinstance(text, str):
            raise CharnnError(f"text must be a string, got {type(text).__name__}")
        if mode not in MODES:
            raise CharnnError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        k, max_chars = _bounded_int("k", k, K_LIMIT), _bounded_int("max_chars", max_chars, MAX_CHARS_LIMIT)
        state, logits = self._read(self._window(text))
        with torch.no_grad(), blas_threads(1 if max(self.beam_width, k) <= SMALL_BATCH else None):
            return self._beam_search(state, logits, self._rules[mode], _start_phase(mode, text), k, max_chars)

    def _score(self, logprob: float, length: int) -> float:
        return logprob / max(length, 1) ** self.length_penalty

    def _beam_search(self, state, logits, rules: _ModeRules, phase: int, k: int, max_chars: int) -> list[Suggestion]:
        """Advance up to ``beam_width`` beams a character at a time (one batched step) until the top ``k`` are settled.

        The bookkeeping runs in numpy on (beams, vocab) arrays; only the
        recurrent step touches the model.
        """
        width, chars = max(self.beam_width, k), self._chars
        vocab = len(chars)
        texts, logprobs, phases = [""], np.zeros(1), np.array([phase])
        found: dict[str, list] = {}  # text -> [logprob, complete, score]

        def add(text: str, logprob: float, complete: bool) -> None:
            if text and logprob > -math.inf:
                old = found.get(text)
                if old is not None:
                    logprob, complete = _logaddexp(old[0], logprob), complete or old[1]
                found[text] = [logprob, complete, self._score(logprob, len(text))]

        for length in range(max_chars):
            total = logprobs[:, None] + _log_softmax(logits.detach().cpu().numpy().astype(np.float64))  # (B, V)
            phase_list = phases.tolist()
            if any(rules.stops[p] for p in phase_list):
                ended = _logsumexp(np.where(rules.stop[phases], total, -np.inf))
                for text, lp in zip(texts, ended.tolist()):
                    add(text, lp, True)
            if any(rules.ends_with[p] for p in phase_list):
                ending = np.where(rules.end_with[phases], total, -np.inf)
                for row, ids in enumerate(_top(ending, k).tolist()):
                    for c in ids:
                        add(texts[row] + chars[c], float(ending[row, c]), True)
            flat = np.where(rules.cont[phases], total, -np.inf).ravel()
            best = _top1d(flat, width)
            best = best[flat[best] > self._bar(found, k, length + 1)]  # live beams that still beat the k-th found
            if len(best) == 0:
                break
            rows, ids = best // vocab, best % vocab
            texts = [texts[r] + chars[c] for r, c in zip(rows.tolist(), ids.tolist())]
            logprobs, phases = flat[best], rules.next[phases[rows], ids]
            if length + 1 == max_chars:  # cut at the length limit
                for text, lp in zip(texts, logprobs.tolist()):
                    if text not in found:
                        add(text, lp, False)
                break
            logits, state = self.stepper.step(torch.from_numpy(ids).to(self.device),
                                              self.stepper.select(state, torch.from_numpy(rows).to(self.device)))
        ranked = heapq.nsmallest(k, found.items(), key=lambda item: (-item[1][2], item[0]))
        return [Suggestion(text, math.exp(lp), score, done) for text, (lp, done, score) in ranked]

    def _bar(self, found: dict, k: int, length: int) -> float:
        """The log-probability a live beam of ``length`` characters needs to score above the k-th best found.

        Beams below the bar are dropped (-inf while fewer than k are found):
        the search ends when no beam is left, and the step batch shrinks as
        the suggestions settle. Like the beam width, this is a heuristic: with
        length normalisation a longer continuation of a dropped beam could in
        rare cases have ranked higher.
        """
        if len(found) < k:
            return -math.inf
        kth = heapq.nlargest(k, (entry[2] for entry in found.values()))[-1]
        return kth * length ** self.length_penalty

    def clear_cache(self) -> None:
        with self._lock:
            self._cache = StateCache(self._cache.capacity)

    def info(self) -> dict:
        """Settings, for ``/v1/model`` and reports."""
        return {"beam_width": self.beam_width, "length_penalty": self.length_penalty,
                "context_chars": self.context_chars, "context_step": self._stride, "cache_size": self._cache.capacity,
                "cached_states": len(self._cache), "modes": list(MODES)}
