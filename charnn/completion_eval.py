"""How much typing an autocomplete saves: a simulated user types a text.

:func:`evaluate_completion` walks through a text one character at a time, as
a user typing it, and asks the completer for suggestions at every position
(with incremental state, timing each call). From those suggestions it plays
two users:

* *top-1*: whenever the first suggestion is what they were about to type,
  they accept it with one keystroke (Tab);
* *top-3*: the same with any of the first three (the longest that fits).

Keystroke savings rate = 1 - keystrokes / characters, in percent. A
suggestion "fits" when the text continues with it and, for a complete
suggestion, the mode's boundary follows (a word is accepted only as a whole
word). Accepting a one-character suggestion saves nothing and is not counted.

The same run scores :class:`DictionaryCompleter`, the classic phone-keyboard
baseline: the most frequent words of the model's training text that start
with the typed prefix.
"""

from __future__ import annotations

import math
import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .completion import PHRASE_END, Completer, Suggestion, is_word_char
from .errors import CharnnError

WORD = re.compile(r"[\w']+")


class DictionaryCompleter:
    """Word completion from word frequencies: the most frequent words that start with the typed prefix.

    The classic phone keyboard: inside a word it completes the word; after a
    space (or at the start) it proposes the most frequent words; after
    punctuation, a space and one of them. Unlike ``Completer.suggest``, it
    cannot tell when the typed word is complete and propose the next one.
    """

    def __init__(self, text: str, max_k: int = 10):
        counts = Counter(WORD.findall(text))
        if not counts:
            raise CharnnError("the dictionary's text has no words; pass the model's training text")
        self.counts = counts
        self.max_k = max_k
        self._by_prefix: dict[str, list[str]] = {}
        for word, _ in sorted(counts.items(), key=lambda wc: (-wc[1], wc[0])):
            for end in range(len(word) + 1):
                bucket = self._by_prefix.setdefault(word[:end], [])
                if len(bucket) <= max_k:  # one spare: the prefix itself is never proposed
                    bucket.append(word)

    def __len__(self) -> int:
        return len(self.counts)

    def suggest(self, text: str, k: int = 3, max_chars: int | None = None) -> list[Suggestion]:
        """The ``k`` commonest words that complete the word ``text`` ends in, no longer than ``max_chars``."""
        if k > self.max_k:
            raise CharnnError(f"the dictionary keeps {self.max_k} words per prefix; ask for k <= {self.max_k}")
        end = len(text)
        while end > 0 and is_word_char(text[end - 1]):
            end -= 1
        prefix = text[end:]
        lead = "" if prefix or not text or text[-1].isspace() else " "
        longest = len(prefix) + (max_chars if max_chars is not None else math.inf) - len(lead)
        words = [w for w in self._by_prefix.get(prefix, []) if w != prefix and len(w) <= longest][:k]
        total = sum(self.counts[w] for w in self._by_prefix.get(prefix, [])) or 1
        return [Suggestion(lead + w[len(prefix):], self.counts[w] / total, 0.0) for w in words]


# -- training text of a checkpoint ---------------------------------------------------------------
def training_text(checkpoint_config: dict) -> str:
    """The part of the corpus a checkpoint was trained on (its first ``1 - val_fraction``)."""
    from .data import read_corpus_text, split_point  # noqa: PLC0415

    training = checkpoint_config.get("training") or {}
    corpus = training.get("corpus")
    if not corpus:
        raise CharnnError("the checkpoint does not record its training corpus; pass the training text with --train-text")
    missing = [p for p in corpus if not Path(p).exists()]
    if missing:
        raise CharnnError(f"the model's training corpus {missing[0]} is not there any more; "
                          f"pass the training text with --train-text")
    text = read_corpus_text(corpus, training.get("glob", "**/*"), training.get("encoding", "utf-8"))
    return text[:split_point(len(text), float(training.get("val_fraction", 0.1)))]


# -- the simulation ---------------------------------------------------------------------------------
def fits(doc: str, pos: int, s: Suggestion, mode: str) -> bool:
    """Whether the user about to type ``doc[pos:]`` would accept ``s`` (as a whole word, phrase or line)."""
    if not doc.startswith(s.text, pos):
        return False
    if not s.complete:
        return True
    end = pos + len(s.text)
    after = doc[end] if end < len(doc) else "\n"
    if mode == "word":
        return not is_word_char(after)
    if mode == "line":
        return after == "\n"
    return s.text[-1] in PHRASE_END or after == "\n"  # phrase


def keystrokes(doc: str, suggestions: list[list[Suggestion]], choices: int, mode: str) -> int:
    """Keystrokes to type ``doc`` when one keystroke accepts any of the first ``choices`` suggestions."""
    pos, strokes = 0, 0
    while pos < len(doc):
        best = max((len(s.text) for s in suggestions[pos][:choices] if fits(doc, pos, s, mode)), default=0)
        pos += best if best >= 2 else 1
        strokes += 1
    return strokes


def savings(doc: str, suggestions: list[list[Suggestion]], mode: str) -> dict:
    """Keystroke savings (percent) for the top-1 and top-3 users."""
    n = len(doc)
    k1, k3 = keystrokes(doc, suggestions, 1, mode), keystrokes(doc, suggestions, 3, mode)
    return {"keystrokes_top1": k1, "keystrokes_top3": k3,
            "savings_top1": 100.0 * (n - k1) / n, "savings_top3": 100.0 * (n - k3) / n}


@dataclass
class _Sweep:
    suggestions: list[list[Suggestion]]
    latencies: np.ndarray
    top1: int
    top5: int


def _sweep(completer: Completer, doc: str, k: int, mode: str, max_chars: int, progress: bool) -> _Sweep:
    """Suggestions and their latency at every position, as if the user typed each character."""
    from tqdm.auto import tqdm  # noqa: PLC0415

    ids = completer.vocab.encode(doc)
    found, lat, top1, top5 = [], np.zeros(len(doc)), 0, 0
    for pos in tqdm(range(len(doc)), desc="typing", unit="char", disable=not progress, mininterval=1.0):
        text = doc[completer.context_start(pos):pos]  # the window the completer would read anyway
        t0 = time.perf_counter()
        found.append(completer.suggest(text, k=k, mode=mode, max_chars=max_chars))
        lat[pos] = time.perf_counter() - t0
        best = completer.next_char_probs(text).topk(min(5, len(completer.vocab))).indices.tolist()
        if ids[pos] != 0:  # an unknown character is never predicted
            top1 += best[0] == ids[pos]
            top5 += int(ids[pos]) in best
    return _Sweep(found, lat, top1, top5)


def evaluate_completion(completer: Completer, doc: str, *, k: int = 3, mode: str = "word", max_chars: int = 32,
                        dictionary: DictionaryCompleter | None = None, progress: bool = True) -> dict:
    """Simulate a user typing ``doc``; keystroke savings, next-character accuracy and latency per keystroke.

    With a ``dictionary`` (word mode only) its savings are reported beside
    the model's, with the difference in points.
    """
    if len(doc) < 2:
        raise CharnnError(f"the text to type holds {len(doc)} character(s); pass a file with at least 2")
    if k < 3:
        raise CharnnError(f"the evaluation reports the top-3 user; use k >= 3, got {k}")
    if dictionary is not None and mode != "word":
        raise CharnnError("the dictionary baseline completes words; use mode word to compare with it")
    sweep = _sweep(completer, doc, k, mode, max_chars, progress)
    ms = sweep.latencies * 1e3
    report = {
        "chars": len(doc), "k": k, "mode": mode,
        "model": savings(doc, sweep.suggestions, mode),
        "next_char_top1": 100.0 * sweep.top1 / len(doc), "next_char_top5": 100.0 * sweep.top5 / len(doc),
        "latency_ms": {"p50": float(np.percentile(ms, 50)), "p95": float(np.percentile(ms, 95)),
                       "p99": float(np.percentile(ms, 99)), "mean": float(ms.mean()), "max": float(ms.max())},
        "completer": completer.info(),
    }
    if dictionary is not None:
        words = [dictionary.suggest(doc[max(0, pos - 64):pos], k=k, max_chars=max_chars) for pos in range(len(doc))]
        report["dictionary"] = {**savings(doc, words, mode), "words": len(dictionary)}
        report["savings_top3_gain_points"] = report["model"]["savings_top3"] - report["dictionary"]["savings_top3"]
        report["savings_top1_gain_points"] = report["model"]["savings_top1"] - report["dictionary"]["savings_top1"]
    return report
