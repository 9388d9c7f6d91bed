"""Corpora larger than memory: encoded once, streaming, into a memory-mapped token file.

Three streaming passes over the files, none of which holds more than one
chunk (16 MiB) of text in memory:

1. count the characters (for UTF-8, by counting non-continuation bytes),
   which places the train/validation split;
2. histogram the characters of the training part, which gives the vocabulary;
3. encode everything into ``uint8`` ids (``uint16`` when the vocabulary has
   more than 256 symbols) in a file that training then memory-maps.

Pure-ASCII chunks skip Unicode decoding entirely. The token file is cached
under ``$CHARNN_CACHE/tokens`` (default ``~/.cache/charnn/tokens``), keyed by
the files' paths, sizes and modification times and the settings, and reused
by later runs.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from .errors import CharnnError, setting
from .vocab import MAX_CODEPOINT, Vocabulary, codepoints

CHUNK_BYTES = 16 * 1024 * 1024
STREAM_THRESHOLD_BYTES = 64 * 1024 * 1024  # larger corpora are streamed to a token file
FORMAT_VERSION = 3  # 2: UTF-16/32 byte-order marks honoured and dropped; 3: CRLF and CR read as LF
UTF8_NAMES = {"utf-8", "utf8", "u8"}

Chunk = tuple[str, "bytes | str"]  # ("ascii", bytes) or ("text", str)


def cache_root() -> Path:
    base = os.environ.get("CHARNN_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "charnn")
    return Path(base) / "tokens"


# -- reading chunks --------------------------------------------------------------------------
def _is_utf8(encoding: str) -> bool:
    return encoding.lower().replace("_", "-") in UTF8_NAMES


def _file_encoding(path: Path, encoding: str) -> str:
    """The encoding ``path`` is read in, as ``data.read_text`` picks it; an unreadable file is a CharnnError."""
    from .data import sniff_encoding  # noqa: PLC0415 (data imports this module)

    try:
        with open(path, "rb") as f:
            return sniff_encoding(f.read(4), encoding)
    except OSError as e:
        raise CharnnError(f"cannot read {path}: {e.strerror}; check the path and its permissions") from e


def _utf8_chunks(path: Path, chunk_bytes: int) -> Iterator[Chunk]:
    from .data import check_not_binary  # noqa: PLC0415

    carry, offset = b"", 0
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk_bytes)
            data = carry + block
            if not data:
                return
            if offset == 0:
                check_not_binary(path, data, "utf-8")
                if data.startswith(codecs.BOM_UTF8):  # a byte-order mark is not text (as in data.read_text)
                    data, offset = data[len(codecs.BOM_UTF8):], len(codecs.BOM_UTF8)
            cut = len(data)
            if block:  # keep a character cut by the block boundary for the next chunk
                back = 0
                while back < min(4, len(data)) and (data[cut - 1 - back] & 0xC0) == 0x80:
                    back += 1
                if back < len(data) and data[cut - 1 - back] >= 0xC0:
                    cut -= back + 1
            piece, carry = data[:cut], data[cut:]
            if piece.isascii():
                yield "ascii", piece
            else:
                try:
                    yield "text", piece.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise CharnnError(f"{path} is not valid utf-8 (byte {offset + e.start}: {e.reason}); "
                                      f"pass its encoding with {setting('encoding')}, e.g. {setting('encoding', 'latin-1')}") from e
            offset += cut
            if not block:
                return


def _decoded_chunks(path: Path, encoding: str, chunk_bytes: int) -> Iterator[Chunk]:
    from .data import check_not_binary, unknown_encoding  # noqa: PLC0415 (data imports this module)

    try:
        decoder = codecs.getincrementaldecoder(encoding)()
    except LookupError as e:
        raise unknown_encoding(encoding) from e
    offset, first = 0, True
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk_bytes)
            if offset == 0:
                check_not_binary(path, block, encoding)
            try:
                text = decoder.decode(block, final=not block)
            except UnicodeDecodeError as e:
                raise CharnnError(f"{path} is not valid {encoding} (byte {offset + e.start}: {e.reason}); "
                                  f"pass its encoding with {setting('encoding')}") from e
            if first and text:  # a byte-order mark is not text (as in data.read_text)
                text, first = text.removeprefix("\ufeff"), False
            if text:
                yield "text", text
            offset += len(block)
            if not block:
                return


def _unix_newlines(chunks: Iterator[Chunk]) -> Iterator[Chunk]:
    """The chunks with CRLF and lone CR line endings turned into LF (as ``data.read_text``); a CR that ends one chunk
    and an LF that starts the next are one line ending."""
    from .data import unix_newlines  # noqa: PLC0415

    after_cr = False
    for kind, piece in chunks:
        if after_cr and piece[:1] in ("\n", b"\n"):
            piece = piece[1:]
        after_cr = piece[-1:] in ("\r", b"\r")
        yield kind, unix_newlines(piece)


def iter_chunks(files: Sequence[Path], encoding: str = "utf-8", chunk_bytes: int | None = None) -> Iterator[Chunk]:
    """The corpus text in chunks, files joined with a newline where one is missing (as ``read_corpus_text``)."""
    chunk_bytes = chunk_bytes or CHUNK_BYTES
    for i, path in enumerate(files):
        last, file_encoding = "", _file_encoding(path, encoding)
        source = (_utf8_chunks(path, chunk_bytes) if _is_utf8(file_encoding)
                  else _decoded_chunks(path, file_encoding, chunk_bytes))
        for kind, piece in _unix_newlines(source):
            if len(piece):
                last = chr(piece[-1]) if kind == "ascii" else piece[-1]
                yield kind, piece
        if i < len(files) - 1 and last != "\n":
            yield "ascii", b"\n"


# -- the three passes --------------------------------------------------------------------------
def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=not enabled, leave=False)


def count_chars(files: Sequence[Path], encoding: str, progress: bool = False) -> int:
    """Characters in the joined corpus; for UTF-8 without decoding (non-continuation bytes)."""
    total = 0
    with _progress(sum(f.stat().st_size for f in files), "counting", progress) as bar:
        for kind, piece in iter_chunks(files, encoding):
            if kind == "ascii":
                total += len(piece)
                bar.update(len(piece))
            else:
                total += len(piece)
                bar.update(len(piece.encode(encoding, "surrogatepass")) if not _is_utf8(encoding) else len(piece.encode()))
    return total


def train_histogram(files: Sequence[Path], encoding: str, n_train: int, progress: bool = False) -> np.ndarray:
    """Character counts (indexed by code point) over the first ``n_train`` characters."""
    hist = np.zeros(MAX_CODEPOINT, dtype=np.int64)
    seen = 0
    with _progress(n_train, "vocabulary", progress) as bar:
        for kind, piece in iter_chunks(files, encoding):
            take = min(len(piece), n_train - seen)
            if take <= 0:
                break
            if kind == "ascii":
                hist[:128] += np.bincount(np.frombuffer(piece, np.uint8, count=take), minlength=128)
            else:
                hist += np.bincount(codepoints(piece[:take]), minlength=MAX_CODEPOINT)
            seen += take
            bar.update(take)
    return hist


def encode_to_file(files: Sequence[Path], encoding: str, vocab: Vocabulary, n_chars: int, path: Path,
                   progress: bool = False) -> None:
    """Write the ids of the whole corpus to ``path`` (raw array of ``vocab.dtype``)."""
    lut = vocab.lookup_table()
    written = 0
    with open(path, "wb") as f, _progress(n_chars, "encoding", progress) as bar:
        for kind, piece in iter_chunks(files, encoding):
            ids = lut[np.frombuffer(piece, np.uint8)] if kind == "ascii" else lut[codepoints(piece)]
            f.write(ids.tobytes())
            written += len(ids)
            bar.update(len(ids))
    if written != n_chars:
        raise CharnnError(f"the corpus changed while it was being read ({n_chars} then {written} characters); try again")


# -- the cache ---------------------------------------------------------------------------------------
def cache_key(files: Sequence[Path], encoding: str, val_fraction: float, min_char_count: int,
              vocab: Vocabulary | None) -> str:
    parts = [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    blob = json.dumps([FORMAT_VERSION, parts, encoding, val_fraction, min_char_count,
                       vocab.to_dict() if vocab else None])  # ASCII: file names that are not UTF-8 escape too
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def load_token_file(files: Sequence[Path], *, encoding: str, val_fraction: float, min_char_count: int,
                    vocab: Vocabulary | None = None, progress: bool = True, cache_dir: Path | None = None):
    """(vocabulary, memory-mapped ids, number of training characters), encoding on first use."""
    from .data import split_point

    root = Path(cache_dir) if cache_dir else cache_root()
    root.mkdir(parents=True, exist_ok=True)
    key = cache_key(files, encoding, val_fraction, min_char_count, vocab)
    meta_path, data_path = root / f"{key}.json", root / f"{key}.bin"
    if not (meta_path.exists() and data_path.exists()):
        n_chars = count_chars(files, encoding, progress)
        if n_chars == 0:
            raise CharnnError("the corpus is empty; pass files that contain text")
        n_train = split_point(n_chars, val_fraction)
        if vocab is None:
            vocab = Vocabulary.from_codepoint_counts(train_histogram(files, encoding, n_train, progress), min_char_count)
        tmp = data_path.with_suffix(f".tmp{os.getpid()}")
        try:
            encode_to_file(files, encoding, vocab, n_chars, tmp, progress)
            os.replace(tmp, data_path)
        finally:
            tmp.unlink(missing_ok=True)
        meta = {"format_version": FORMAT_VERSION, "vocab": vocab.to_dict(), "n_chars": n_chars, "n_train": n_train,
                "dtype": vocab.dtype.name, "files": [str(f) for f in files]}
        meta_tmp = meta_path.with_suffix(f".tmp{os.getpid()}")
        meta_tmp.write_text(json.dumps(meta), encoding="utf-8")  # ASCII, as the key
        os.replace(meta_tmp, meta_path)
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    vocab = Vocabulary.from_dict(meta["vocab"])
    ids = np.memmap(data_path, dtype=np.dtype(meta["dtype"]), mode="r", shape=(meta["n_chars"],))
    return vocab, ids, meta["n_train"]
