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

import codecs
import itertools
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from .errors import CharnnError, setting
from .vocab import Vocabulary, training_vocabulary

BINARY_SNIFF_BYTES = 8192


# -- reading files --------------------------------------------------------------
def resolve_files(paths: Sequence[str | Path], glob: str = "**/*") -> list[Path]:
    """Expand files and directories (searched with ``glob``) into a sorted file list, each file once (a file named
    twice, or also found in a folder given, would put its own copy into validation)."""
    if not paths:
        raise CharnnError("no corpus given; pass one or more text files or directories")
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            # hidden files and everything under hidden folders (.git, .venv...) are skipped
            try:
                found = sorted(f for f in p.glob(glob)
                               if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts))
            except (ValueError, NotImplementedError) as e:  # '', '/abs/*.txt', '***'
                raise CharnnError(f"{setting('glob')} {glob!r} is not a usable pattern ({e}); give one relative to "
                                  "the folder, such as '**/*.txt'") from None
            check_listable(p, recursive="**" in glob)
            if not found:
                raise CharnnError(f"directory {p} has no files matching {setting('glob')} {glob!r}; change {setting('glob')} or the path")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        elif p.exists():
            raise CharnnError(f"{p} is neither a file nor a directory; pass text files or directories")
        elif p.is_symlink():
            raise CharnnError(f"{p} is a symbolic link to {os.readlink(p)}, which is missing or loops back; fix the link "
                              "or pass its target")
        else:
            raise CharnnError(f"{p}: no such file or directory; check the path")
    first: dict[Path, Path] = {}
    for f in files:
        first.setdefault(f.resolve(), f)
    return list(first.values())


def check_listable(folder: Path, recursive: bool) -> None:
    """Refuse a ``folder`` that cannot be listed, or (``recursive``) a non-hidden folder under it: a glob skips those
    silently, leaving their files out."""
    def refuse(e: OSError):
        raise CharnnError(f"cannot list folder {e.filename} ({e.strerror}), so its files would be left out; make it "
                          "readable, or pass the files or folders you mean")

    walk = os.walk(folder, onerror=refuse)
    for _, dirs, _ in walk if recursive else itertools.islice(walk, 1):
        dirs[:] = [d for d in dirs if not d.startswith(".")]


def read_text(path: Path, encoding: str = "utf-8") -> str:
    """Read one text file, refusing binary files and undecodable bytes with a clear error.

    A byte-order mark (which some Windows editors write) is not text and is dropped; a file read as UTF-8 that starts
    with a UTF-16 or UTF-32 one is read in that encoding (see :func:`sniff_encoding`). Windows (CRLF) and old Mac (CR)
    line endings read as newlines, as Python's text files read them."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CharnnError(f"cannot read {path}: {e.strerror}; check the path and its permissions") from e
    encoding = sniff_encoding(data, encoding)
    check_not_binary(path, data, encoding)
    text = unix_newlines(decode_text(data, encoding, str(path)))
    return text[1:] if text.startswith("\ufeff") else text


def unix_newlines(text):
    """``text`` (a str or bytes) with CRLF and lone CR line endings turned into LF."""
    cr, lf = ("\r", "\n") if isinstance(text, str) else (b"\r", b"\n")
    return text.replace(cr + lf, lf).replace(cr, lf) if cr in text else text


BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF16_LE, "utf-16"),
        (codecs.BOM_UTF16_BE, "utf-16"))  # UTF-32's little-endian mark starts with UTF-16's: it comes first


def sniff_encoding(head: bytes, encoding: str) -> str:
    """``encoding``, or UTF-16/32 where a file to read as UTF-8 starts with their byte-order mark (Windows tools such as
    PowerShell write UTF-16 so): those bytes are never valid UTF-8."""
    try:
        if codecs.lookup(encoding).name not in ("utf-8", "utf-8-sig"):
            return encoding
    except LookupError:
        return encoding  # decoding names the unknown encoding
    return next((name for bom, name in BOMS if head.startswith(bom)), encoding)


def check_not_binary(path: Path, head: bytes, encoding: str) -> None:
    """Refuse a file whose first bytes hold a NUL (a binary file), unless ``encoding`` is UTF-16/32 (whose text has them)."""
    if b"\x00" in head[:BINARY_SNIFF_BYTES] and not encoding.lower().replace("-", "").replace("_", "").startswith(("utf16", "utf32")):
        raise CharnnError(f"{path} looks like a binary file (it contains NUL bytes); pass text files only")


def decode_text(data: bytes, encoding: str, source: str, fix: str = "") -> str:
    """``data`` (read from ``source``) decoded with ``encoding``; an unknown encoding or undecodable bytes are a
    CharnnError whose fix is ``fix`` (default: name the encoding)."""
    try:
        return data.decode(encoding)
    except LookupError as e:
        raise unknown_encoding(encoding) from e
    except UnicodeDecodeError as e:
        fix = fix or f"pass its encoding with {setting('encoding')}, e.g. {setting('encoding', 'latin-1')}"
        raise CharnnError(f"{source} is not valid {encoding} (byte {e.start}: {e.reason}); {fix}") from e


def unknown_encoding(encoding: str) -> CharnnError:
    return CharnnError(f"unknown encoding {encoding!r}; pass a valid {setting('encoding')} such as utf-8 or latin-1")


def read_stdin(encoding: str = "utf-8", fix: str = "") -> str:
    """Standard input decoded with ``encoding``; undecodable bytes are a CharnnError (not a traceback under a UTF-8
    locale, nor raw bytes passed on under the C locale's surrogateescape) whose fix is ``fix`` (default: name the
    encoding)."""
    return decode_text(sys.stdin.buffer.read(), encoding, "standard input", fix)


def read_corpus_text(paths: Sequence[str | Path], glob: str = "**/*", encoding: str = "utf-8") -> str:
    """Concatenate the corpus files, adding a newline between files where one is missing.

    An empty result is an error."""
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
        raise CharnnError(f"{setting('val_fraction')} must be in [0, 1), got {val_fraction}")
    return n - int(math.floor(n * val_fraction))


def load_corpus(
    paths: Sequence[str | Path],
    *,
    glob: str = "**/*",
    encoding: str = "utf-8",
    val_fraction: float = 0.1,
    min_char_count: int = 1,
    vocab: Vocabulary | None = None,
    stream_threshold: int | None = None,
    progress: bool = True,
) -> Corpus:
    """Read, split and encode a corpus. A given ``vocab`` is reused (fine-tuning, resuming).

    Corpora above ``stream_threshold`` bytes (default 64 MiB) are encoded once,
    streaming, into a cached memory-mapped token file (see ``tokenstore``);
    smaller ones are read into memory.
    """
    from . import tokenstore

    split_point(1, val_fraction)  # validates the fraction before any reading
    files = resolve_files(paths, glob)
    threshold = tokenstore.STREAM_THRESHOLD_BYTES if stream_threshold is None else stream_threshold
    if sum(f.stat().st_size for f in files) > threshold:
        vocab, ids, n_train = tokenstore.load_token_file(
            files, encoding=encoding, val_fraction=val_fraction, min_char_count=min_char_count, vocab=vocab,
            progress=progress)
        return Corpus(vocab, ids[:n_train], ids[n_train:], [str(p) for p in paths])
    text = read_corpus_text(files, "", encoding)
    cut = split_point(len(text), val_fraction)
    train_text, val_text = text[:cut], text[cut:]
    if vocab is None:
        vocab = training_vocabulary(train_text, min_char_count)
    return Corpus(vocab, vocab.encode(train_text), vocab.encode(val_text), [str(p) for p in paths])


# -- batching -----------------------------------------------------------------------
class StreamBatcher:
    """Truncated-BPTT batches over contiguous streams of ``data``.

    The text is cut into ``world_size * grad_accum * batch_size`` streams (the
    global batch). Process ``rank`` reads its own disjoint
    ``grad_accum * batch_size`` of them, as ``grad_accum`` micro-batches per
    step, so the same global batch gives the same streams on any number of
    processes.
    """

    def __init__(self, data: np.ndarray, batch_size: int, seq_len: int, rank: int = 0, world_size: int = 1,
                 grad_accum: int = 1):
        self.data, self.batch_size, self.seq_len = data, batch_size, seq_len
        self.rank, self.world_size, self.grad_accum = rank, world_size, grad_accum
        self.rows_per_rank = batch_size * grad_accum
        self.n_streams = self.rows_per_rank * world_size
        # Leave room for any offset below seq_len plus the one-character target shift.
        self.steps_per_epoch = (len(data) - seq_len) // (self.n_streams * seq_len)
        if self.steps_per_epoch < 1:
            need = self.n_streams * seq_len + seq_len
            raise CharnnError(
                f"the training text is too short for one batch: {len(data):,} characters, "
                f"need at least {need:,} ({self.n_streams} streams (batch size x grad accumulation x processes) "
                f"x seq len {seq_len}, plus one seq len); lower {setting('batch_size')} or {setting('seq_len')}, or give more text"
            )

    def batches(self, offset: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield this rank's (inputs, targets) int64 tensors of shape (batch * grad_accum, seq_len)."""
        T = self.seq_len
        span = self.steps_per_epoch * T
        n = self.n_streams * span
        rows = slice(self.rank * self.rows_per_rank, (self.rank + 1) * self.rows_per_rank)
        x = self.data[offset : offset + n].reshape(-1, span)[rows]
        y = self.data[offset + 1 : offset + 1 + n].reshape(-1, span)[rows]
        for i in range(start, self.steps_per_epoch):
            cols = slice(i * T, (i + 1) * T)
            yield (
                torch.from_numpy(x[:, cols].astype(np.int64)),
                torch.from_numpy(y[:, cols].astype(np.int64)),
            )


EVAL_STREAM_CHARS = 16_384  # automatic stream count: each stream scores at least this many characters
MAX_EVAL_STREAMS = 64


def eval_stream_count(n_targets: int) -> int:
    """Streams for scoring ``n_targets`` characters: as few as keep a pass batched.

    Every stream starts from a zero state, and its first few dozen characters
    score worse than the rest (64 streams over tiny Shakespeare's 111,539
    validation characters cost 0.007 bpc against one stream), so streams are
    at least ``EVAL_STREAM_CHARS`` long. On a CPU 8 streams run as fast as
    64; the cap keeps long texts parallel on a GPU.
    """
    return int(min(max(n_targets // EVAL_STREAM_CHARS, 1), MAX_EVAL_STREAMS))


def eval_streams(data: np.ndarray, n_streams: int | None, seq_len: int, rank: int = 0, world_size: int = 1,
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Cover every target of ``data`` exactly once with carried-state chunks.

    The text is cut into ``n_streams`` contiguous streams (None: see
    :func:`eval_stream_count`; fewer for short text; the last one takes the
    remainder); yields (inputs, targets, mask)
    chunks of shape (streams, seq_len), the mask marking real targets. Only one
    chunk is materialised at a time, so ``data`` may be a memory map. With
    ``world_size`` > 1, process ``rank`` gets every ``world_size``-th stream.
    """
    n_targets = len(data) - 1
    if n_targets < 1:
        return
    n_streams = eval_stream_count(n_targets) if n_streams is None else n_streams
    n_streams = max(1, min(n_streams, n_targets // max(seq_len, 1)))
    length = n_targets // n_streams
    starts = np.arange(n_streams) * length
    lengths = np.full(n_streams, length)
    lengths[-1] += n_targets - n_streams * length
    mine = np.arange(n_streams)[rank::world_size]
    starts, lengths = starts[mine], lengths[mine]
    if not len(mine):
        return
    for s in range(0, int(lengths.max()), seq_len):
        cols = s + np.arange(seq_len)
        valid = cols[None, :] < lengths[:, None]
        idx = np.where(valid, starts[:, None] + cols[None, :], 0)
        x = np.asarray(data[idx], dtype=np.int64)
        y = np.asarray(data[idx + 1], dtype=np.int64)
        yield torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(valid)
