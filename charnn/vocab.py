"""Character vocabulary: a stable mapping between characters and integer ids.

Id 0 is always the unknown symbol. It stands for characters never seen in
training, and for characters rarer than ``min_count``, so inference on new
text never crashes on an unfamiliar character.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Iterable, Mapping

import numpy as np

from .errors import CharnnError, setting

UNK = "\ufffd"  # shown in decoded text where the unknown symbol stands
UNK_ID = 0
MAX_CODEPOINT = 0x110000


class Vocabulary:
    """Characters sorted by code point after the unknown symbol at id 0."""

    def __init__(self, chars: Iterable[str]):
        chars = sorted(set(chars) - {UNK})
        for ch in chars:
            if len(ch) != 1:
                raise ValueError(f"vocabulary entries must be single characters, got {ch!r}")
        self.chars: list[str] = [UNK] + chars
        self.index: dict[str, int] = {ch: i for i, ch in enumerate(self.chars)}
        self._lut: np.ndarray | None = None

    # -- construction -------------------------------------------------------
    @classmethod
    def from_counts(cls, counts: Mapping[str, int], min_count: int = 1) -> "Vocabulary":
        """Keep the characters seen at least ``min_count`` times."""
        return cls(ch for ch, n in counts.items() if n >= min_count)

    @classmethod
    def from_text(cls, text: str, min_count: int = 1) -> "Vocabulary":
        return cls.from_counts(Counter(text), min_count)

    @classmethod
    def from_codepoint_counts(cls, counts: np.ndarray, min_count: int = 1) -> "Vocabulary":
        """Build from a histogram indexed by Unicode code point (see ``count_codepoints``)."""
        cps = np.nonzero(counts >= max(min_count, 1))[0]
        return cls(chr(int(c)) for c in cps if not 0xD800 <= c < 0xE000)

    # -- (de)serialisation ---------------------------------------------------
    def to_dict(self) -> dict:
        return {"chars": self.chars[1:], "unk": UNK}

    @classmethod
    def from_dict(cls, data: dict) -> "Vocabulary":
        try:
            return cls(data["chars"])
        except (KeyError, TypeError, ValueError) as e:
            raise CharnnError(f"invalid vocabulary ({e}); the checkpoint's vocab.json is damaged") from e

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False)

    # -- mapping ---------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.chars)

    def __contains__(self, ch: str) -> bool:
        return ch in self.index and ch != UNK

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.chars == other.chars

    @property
    def dtype(self) -> np.dtype:
        """Smallest unsigned integer type that holds every id."""
        return np.dtype(np.uint8 if len(self) <= 256 else np.uint16 if len(self) <= 65536 else np.uint32)

    def lookup_table(self) -> np.ndarray:
        """Array mapping every code point to its id (unknowns to 0)."""
        if self._lut is None:
            lut = np.zeros(MAX_CODEPOINT, dtype=self.dtype)
            for i, ch in enumerate(self.chars[1:], start=1):
                lut[ord(ch)] = i
            self._lut = lut
        return self._lut

    def encode(self, text: str) -> np.ndarray:
        """Ids of ``text`` as a compact numpy array; unknown characters become 0."""
        if not text:
            return np.zeros(0, dtype=self.dtype)
        cps = codepoints(text)
        return self.lookup_table()[cps]

    def unknown_chars(self, text: str) -> list[str]:
        """Distinct characters of ``text`` that the vocabulary does not know."""
        return sorted({ch for ch in set(text) if ch not in self})

    def decode(self, ids: Iterable[int]) -> str:
        chars = self.chars
        return "".join(chars[int(i)] for i in ids)


def codepoints(text: str) -> np.ndarray:
    """Unicode code points of ``text`` as uint32, computed in C by the codec."""
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)


def count_codepoints(text: str, counts: np.ndarray | None = None) -> np.ndarray:
    """Add ``text``'s character histogram (indexed by code point) to ``counts``."""
    hist = np.bincount(codepoints(text), minlength=MAX_CODEPOINT)
    if counts is None:
        return hist
    counts += hist
    return counts


def training_vocabulary(text: str, min_count: int = 1, what: str = "the training text") -> Vocabulary:
    """The characters of ``text`` (``what``, in the message) that occur ``min_count`` times or more; a threshold
    that leaves none is a CharnnError naming it."""
    vocab = Vocabulary.from_text(text, min_count=min_count)
    if len(vocab) < 2 and text:
        raise CharnnError(f"no character occurs {min_count} times in {what} ({len(text):,} characters); "
                          f"lower {setting('min_char_count')}")
    return vocab
