"""Reading corpora and cutting them into truncated-BPTT batches.

A corpus is one or more UTF-8 files (or directories searched with a glob),
concatenated in sorted order. The first ``1 - val_fraction`` of the text
trains and the rest validates; the vocabulary comes from the training part.

Batches follow char-rnn's loader: the training text is divided into
``batch_size`` contiguous streams, and consecutive batches hold consecutive
``seq_len`` chunks of every stream, so the recurrent state can be carried from
one batch to the next. Each epoch starts at a random offset below ``seq_len``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from .errors import CharnnError
from .vocab import Vocabulary

BINARY_SNIFF_BYTES = 8192


# -- reading files --------------------------------------------------------------
def resolve_files(paths: Sequence[str | Path], glob: str = "**/*") -> list[Path]:
    """Expand files and directories (searched with ``glob``) into a sorted file list."""
    if not paths:
        raise CharnnError("no corpus given; pass one or more text files or directories")
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.glob(glob) if f.is_file() and not f.name.startswith("."))
            if not found:
                raise CharnnError(f"directory {p} has no files matching --glob {glob!r}; change --glob or the path")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        elif p.exists():
            raise CharnnError(f"{p} is neither a file nor a directory; pass text files or directories")
        else:
            raise CharnnError(f"{p}: no such file or directory; check the path")
    return files


def read_text(path: Path, encoding: str = "utf-8") -> str:
    """Read one text file, refusing binary files and undecodable bytes with a clear error."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CharnnError(f"cannot read {path}: {e.strerror}; check the path and its permissions") from e
    if b"\x00" in data[:BINARY_SNIFF_BYTES] and not encoding.lower().replace("-", "").startswith("utf16"):
        raise CharnnError(f"{path} looks like a binary file (it contains NUL bytes); pass text files only")
    try:
        return data.decode(encoding)
    except LookupError as e:
        raise CharnnError(f"unknown encoding {encoding!r}; pass a valid --encoding such as utf-8 or latin-1") from e
    except UnicodeDecodeError as e:
        raise CharnnError(
            f"{path} is not valid {encoding} (byte {e.start}: {e.reason}); "
            f"pass its encoding with --encoding, e.g. --encoding latin-1"
        ) from e


def read_corpus_text(paths: Sequence[str | Path], glob: str = "**/*", encoding: str = "utf-8") -> str:
    """Concatenate the corpus files; an empty result is an error."""
    texts = [read_text(f, encoding) for f in resolve_files(paths, glob)]
    text = "".join(t if t.endswith("\n") or i == len(texts) - 1 else t + "\n" for i, t in enumerate(texts))
    if not text.strip():
        raise CharnnError(f"the corpus is empty ({', '.join(map(str, paths))}); pass files that contain text")
    return text


# -- the encoded corpus -----------------------------------------------------------
@dataclass
class Corpus:
    """A corpus encoded with its vocabulary and split into training and validation ids."""

    vocab: Vocabulary
    train: np.ndarray
    val: np.ndarray
    sources: list[str] = field(default_factory=list)

    @property
    def n_chars(self) -> int:
        return len(self.train) + len(self.val)


def split_point(n: int, val_fraction: float) -> int:
    """Index where validation starts: the last ``val_fraction`` of ``n`` characters."""
    if not 0.0 <= val_fraction < 1.0:
        raise CharnnError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    return n - int(math.floor(n * val_fraction))


def load_corpus(
    paths: Sequence[str | Path],
    *,
    glob: str = "**/*",
    encoding: str = "utf-8",
    val_fraction: float = 0.1,
    min_char_count: int = 1,
    vocab: Vocabulary | None = None,
) -> Corpus:
    """Read, split and encode a corpus. A given ``vocab`` is reused (fine-tuning, resuming)."""
    text = read_corpus_text(paths, glob, encoding)
    cut = split_point(len(text), val_fraction)
    train_text, val_text = text[:cut], text[cut:]
    if vocab is None:
        vocab = Vocabulary.from_text(train_text, min_count=min_char_count)
    return Corpus(vocab, vocab.encode(train_text), vocab.encode(val_text), [str(p) for p in paths])


# -- batching -----------------------------------------------------------------------
class StreamBatcher:
    """Truncated-BPTT batches over ``batch_size`` contiguous streams of ``data``.

    With ``world_size`` > 1 the text is cut into ``world_size * batch_size``
    streams and rank ``rank`` reads its own disjoint ``batch_size`` of them.
    """

    def __init__(self, data: np.ndarray, batch_size: int, seq_len: int, rank: int = 0, world_size: int = 1):
        self.data, self.batch_size, self.seq_len = data, batch_size, seq_len
        self.rank, self.world_size = rank, world_size
        n_streams = batch_size * world_size
        # Leave room for any offset below seq_len plus the one-character target shift.
        self.steps_per_epoch = (len(data) - seq_len) // (n_streams * seq_len)
        if self.steps_per_epoch < 1:
            need = n_streams * seq_len + seq_len
            raise CharnnError(
                f"the training text is too short for one batch: {len(data):,} characters, "
                f"need at least {need:,} (batch size {batch_size} x {world_size} process(es) x seq len {seq_len}, "
                f"plus one seq len); lower --batch-size or --seq-len, or give more text"
            )

    def batches(self, offset: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (inputs, targets) int64 tensors of shape (batch, seq_len), from step ``start``."""
        T, B = self.seq_len, self.batch_size
        span = self.steps_per_epoch * T
        n = self.batch_size * self.world_size * span
        rows = slice(self.rank * B, (self.rank + 1) * B)
        x = self.data[offset : offset + n].reshape(-1, span)[rows]
        y = self.data[offset + 1 : offset + 1 + n].reshape(-1, span)[rows]
        for i in range(start, self.steps_per_epoch):
            cols = slice(i * T, (i + 1) * T)
            yield (
                torch.from_numpy(x[:, cols].astype(np.int64)),
                torch.from_numpy(y[:, cols].astype(np.int64)),
            )


def eval_streams(data: np.ndarray, n_streams: int, seq_len: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Cover every target of ``data`` once with carried-state chunks.

    The text is cut into ``n_streams`` contiguous streams (fewer for short
    text); yields (inputs, targets, mask) chunks, the mask marking real targets
    in the last, possibly ragged, chunk.
    """
    n_targets = len(data) - 1
    if n_targets < 1:
        return
    n_streams = max(1, min(n_streams, n_targets // max(seq_len, 1)))
    length = math.ceil(n_targets / n_streams)
    pad = n_streams * length - n_targets
    ids = data.astype(np.int64)
    x = np.concatenate([ids[:-1], np.zeros(pad, np.int64)]).reshape(n_streams, length)
    y = np.concatenate([ids[1:], np.zeros(pad, np.int64)]).reshape(n_streams, length)
    valid = np.concatenate([np.ones(n_targets, bool), np.zeros(pad, bool)]).reshape(n_streams, length)
    for s in range(0, length, seq_len):
        cols = slice(s, s + seq_len)
        yield torch.from_numpy(x[:, cols].copy()), torch.from_numpy(y[:, cols].copy()), torch.from_numpy(valid[:, cols].copy())
