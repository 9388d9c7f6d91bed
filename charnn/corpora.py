"""A small catalogue of text corpora to train on, and builders for them.

Two kinds of corpus exist:

``builtin``
    Built offline from files that ship with every Python install, so they
    work with no network at all: ``python-docs`` (the interpreter's bundled
    documentation topics, English prose) and ``python-stdlib`` (the standard
    library's own Python source code).

``download``
    A recipe: a URL plus the SHA-256 of the expected file. The file is
    downloaded once into a cache directory, checked against the hash, and
    reused from the cache afterwards. The cache directory is
    ``$CHARNN_CACHE/corpora`` when ``CHARNN_CACHE`` is set, otherwise
    ``$XDG_CACHE_HOME/charnn/corpora`` or ``~/.cache/charnn/corpora``.

Typical use::

    from charnn.corpora import list_corpora, build_corpus

    for entry in list_corpora():
        print(entry.name, entry.kind, entry.description)
    build_corpus("tinyshakespeare", "data/shakespeare.txt")

Every output is UTF-8 text with ``\\n`` line endings, written atomically (a
temporary file in the output directory, then :func:`os.replace`), so an
interrupted or failed build never leaves a partial file behind. Problems the
user can fix (unknown name, no network, existing output, ...) raise
:class:`charnn.errors.CharnnError` with a one-line message. Library functions
print nothing except an optional tqdm progress bar on stderr while
downloading.

Adding a download recipe: append a :class:`CorpusEntry` with
``kind="download"``, its ``url`` and the ``sha256`` of the exact file served
there (``sha256sum file``) to :data:`CATALOGUE`; see ``corpora/README.md``.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import sys
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import CharnnError, check_output_file, make_dirs

__all__ = [
    "CATALOGUE",
    "CorpusEntry",
    "OutputExistsError",
    "build_corpus",
    "cache_dir",
    "corpus_text",
    "fetch_corpus",
    "get_corpus",
    "list_corpora",
    "python_docs_text",
    "python_stdlib_text",
    "text_stats",
]

#: Seconds to wait for the server before a download gives up.
DOWNLOAD_TIMEOUT = 30.0

_CHUNK = 1 << 16


@dataclass(frozen=True)
class CorpusEntry:
    """One corpus in the catalogue.

    Attributes:
        name: identifier used on the command line (``charnn corpus build NAME``).
        description: one line saying what the text is.
        licence: the licence / copyright status of the text.
        kind: ``"builtin"`` (built offline from the Python install) or
            ``"download"`` (fetched from ``url`` and checked against ``sha256``).
        url: where a ``download`` corpus is fetched from; ``None`` for builtins.
        sha256: hex SHA-256 of the exact file at ``url``; ``None`` for builtins.
        size_chars: number of characters, when known in advance (builtins
            depend on the Python version, so they leave it ``None``).
    """

    name: str
    description: str
    licence: str
    kind: str
    url: str | None = None
    sha256: str | None = None
    size_chars: int | None = None

    def to_dict(self) -> dict:
        """The entry as a JSON-serialisable dict."""
        return {
            "name": self.name,
            "kind": self.kind,
            "description": self.description,
            "licence": self.licence,
            "url": self.url,
            "sha256": self.sha256,
            "size_chars": self.size_chars,
        }


#: Every known corpus, by name, in display order. Tests may add entries.
CATALOGUE: dict[str, CorpusEntry] = {
    e.name: e
    for e in [
        CorpusEntry(
            name="tinyshakespeare",
            description="Tiny Shakespeare: ~40k lines of Shakespeare's plays, "
            "the classic char-rnn dataset (65 distinct characters).",
            licence="Public domain text (Shakespeare); compiled by Andrej Karpathy "
            "for char-rnn (MIT-licensed repository).",
            kind="download",
            url="https://raw.githubusercontent.com/karpathy/char-rnn/master/"
            "data/tinyshakespeare/input.txt",
            sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
            size_chars=1_115_394,
        ),
        CorpusEntry(
            name="python-docs",
            description="English prose: the documentation topics bundled with "
            "this Python (pydoc_data), offline.",
            licence="PSF-2.0 (Python documentation).",
            kind="builtin",
        ),
        CorpusEntry(
            name="python-stdlib",
            description="Python source code: this interpreter's standard library "
            "*.py files without tests, offline.",
            licence="PSF-2.0 (Python standard library).",
            kind="builtin",
        ),
    ]
}


def list_corpora() -> list[CorpusEntry]:
    """All catalogue entries, in display order."""
    return list(CATALOGUE.values())


def get_corpus(name: str) -> CorpusEntry:
    """The catalogue entry called ``name``.

    Raises:
        CharnnError: no such corpus; the message lists the known names.
    """
    try:
        return CATALOGUE[name]
    except KeyError:
        known = ", ".join(CATALOGUE)
        raise CharnnError(
            f"unknown corpus {name!r}; known corpora: {known} (see `charnn corpus list`)"
        ) from None


# ---------------------------------------------------------------------------
# Offline builders


def python_docs_text() -> str:
    """The interpreter's bundled documentation topics as one text.

    Topics come from ``pydoc_data.topics.topics`` (topic name -> text), in
    sorted-name order, separated by blank lines; the result is deterministic
    for a given Python version.

    Raises:
        CharnnError: ``pydoc_data`` is not installed (some distributions
            strip it).
    """
    try:
        from pydoc_data.topics import topics
    except ImportError as e:
        raise CharnnError(
            f"corpus python-docs needs the pydoc_data module, which this Python lacks ({e}); "
            "install your distribution's full Python package (e.g. python3-doc / "
            "libpython3-stdlib) or pick another corpus"
        ) from None
    parts = [topics[key].strip("\n") for key in sorted(topics)]
    return "\n\n".join(p for p in parts if p.strip()) + "\n"


_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


def _is_test_file(filename: str) -> bool:
    return filename.startswith("test_") or filename.endswith("_test.py")


def _stdlib_files(root: Path) -> list[Path]:
    """Sorted ``*.py`` files under ``root``, without test and third-party dirs."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.startswith(".")]
        for f in filenames:
            if f.endswith(".py") and not _is_test_file(f):
                found.append(Path(dirpath, f))
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def python_stdlib_text(max_chars: int | None = None, *, root: str | os.PathLike | None = None) -> str:
    """The standard library's Python sources as one text.

    Every ``*.py`` file under ``root`` (default: ``sysconfig.get_paths()["stdlib"]``)
    in sorted path order, each preceded by a header line
    ``# ---- relative/path.py ----`` and followed by a blank line. Directories
    named ``test``/``tests``/``idle_test`` (at any depth), ``site-packages`` and
    ``dist-packages`` are skipped, and so are files that do not decode as UTF-8.
    Line endings are normalised to ``\\n``.

    Args:
        max_chars: stop once the text reaches this many characters (the
            result is cut to exactly ``max_chars``); ``None`` for everything.
        root: the directory to read; mainly for tests.

    Raises:
        CharnnError: the directory is missing or contains no Python files.
    """
    import sysconfig

    root = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise CharnnError(
            f"the Python standard library directory {root} does not exist; "
            "corpus python-stdlib needs a Python install with its sources"
        )
    parts: list[str] = []
    total = 0
    for path in _stdlib_files(root):
        try:
            src = path.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        src = src.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
        if src and not src.endswith("\n"):
            src += "\n"
        chunk = f"# ---- {path.relative_to(root).as_posix()} ----\n{src}\n"
        parts.append(chunk)
        total += len(chunk)
        if max_chars is not None and total >= max_chars:
            break
    if not parts:
        raise CharnnError(
            f"no readable Python files found under {root}; corpus python-stdlib needs "
            "a Python install with its .py sources"
        )
    text = "".join(parts)
    return text[:max_chars] if max_chars is not None else text


_BUILDERS: dict[str, Callable[[int | None], str]] = {
    "python-docs": lambda max_chars: python_docs_text(),
    "python-stdlib": lambda max_chars: python_stdlib_text(max_chars),
}


# ---------------------------------------------------------------------------
# Downloads


def cache_dir() -> Path:
    """Where downloaded corpora are cached (not created here).

    ``$CHARNN_CACHE/corpora`` if ``CHARNN_CACHE`` is set, else
    ``$XDG_CACHE_HOME/charnn/corpora``, else ``~/.cache/charnn/corpora``.
    """
    env = os.environ.get("CHARNN_CACHE")
    if env:
        return Path(env).expanduser() / "corpora"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "charnn" / "corpora"


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _unlink_quietly(path: str | os.PathLike | None) -> None:
    if path is None:
        return
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError:
        pass


def _download_error(entry: CorpusEntry, reason: str) -> CharnnError:
    return CharnnError(
        f"could not download {entry.name} from {entry.url} ({reason}); check your "
        "connection, or download it yourself and pass the file to charnn train"
    )


def fetch_corpus(name: str, *, progress: bool = True) -> Path:
    """Download a ``download`` corpus into the cache and return the cached path.

    A cached file whose SHA-256 matches is reused without touching the
    network; a cached file that does not match is replaced. The download
    streams to a temporary file in the cache directory, is checked against the
    recipe's SHA-256, and only then moved into place, so the cache never holds
    a partial or wrong file.

    Args:
        name: a catalogue entry of kind ``"download"``.
        progress: show a tqdm progress bar on stderr while downloading.

    Raises:
        CharnnError: unknown name, not a download corpus, network or HTTP
            failure, hash mismatch, or an unwritable cache directory.
    """
    entry = get_corpus(name)
    if entry.kind != "download" or not entry.url or not entry.sha256:
        raise CharnnError(f"corpus {name!r} is built offline, not downloaded; use build_corpus")
    directory = cache_dir()
    target = directory / f"{entry.name}.txt"
    expected = entry.sha256.lower()
    if target.is_file():
        if _sha256_file(target) == expected:
            return target
        _unlink_quietly(target)  # stale or corrupt: fetch again
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CharnnError(
            f"cannot create the corpus cache directory {directory} ({e.strerror or e}); "
            "set CHARNN_CACHE to a writable directory"
        ) from None

    try:
        fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=f".{entry.name}.", suffix=".part")
    except OSError as e:
        raise CharnnError(
            f"cannot write to the corpus cache directory {directory} ({e.strerror or e}); "
            "set CHARNN_CACHE to a writable directory"
        ) from None
    try:
        h = hashlib.sha256()
        request = urllib.request.Request(entry.url, headers={"User-Agent": "charnn"})
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(
                request, timeout=DOWNLOAD_TIMEOUT
            ) as resp:
                length = resp.headers.get("Content-Length")
                bar = None
                if progress:
                    from tqdm import tqdm

                    bar = tqdm(
                        total=int(length) if length and length.isdigit() else None,
                        unit="B",
                        unit_scale=True,
                        desc=f"downloading {entry.name}",
                        file=sys.stderr,
                        leave=False,
                    )
                try:
                    while True:
                        block = resp.read(_CHUNK)
                        if not block:
                            break
                        out.write(block)
                        h.update(block)
                        if bar is not None:
                            bar.update(len(block))
                finally:
                    if bar is not None:
                        bar.close()
        except urllib.error.HTTPError as e:
            raise _download_error(entry, f"HTTP {e.code} {e.reason}") from None
        except urllib.error.URLError as e:
            raise _download_error(entry, str(e.reason)) from None
        except (OSError, ValueError, http.client.HTTPException) as e:
            # ValueError: a malformed URL; OSError: resets, timeouts; HTTPException: bad replies
            reason = "timed out" if isinstance(e, TimeoutError) else str(e) or type(e).__name__
            raise _download_error(entry, reason) from None
        actual = h.hexdigest()
        if actual != expected:
            raise CharnnError(
                f"download of {entry.name} from {entry.url} has SHA-256 {actual}, expected "
                f"{expected}; the file changed upstream or was corrupted in transit: try "
                "again, or download it yourself and pass the file to charnn train"
            )
        os.replace(tmp_name, target)
        tmp_name = None
    finally:
        _unlink_quietly(tmp_name)
    return target


# ---------------------------------------------------------------------------
# Building


def _check_max_chars(max_chars: int | None) -> None:
    if max_chars is not None and (isinstance(max_chars, bool) or not isinstance(max_chars, int)
                                  or max_chars < 1):
        raise CharnnError(f"max_chars must be a positive whole number, got {max_chars!r}")


def corpus_text(name: str, *, progress: bool = True, max_chars: int | None = None) -> str:
    """The text of corpus ``name`` as a string (downloading it if needed).

    Args:
        name: a catalogue name (see :func:`list_corpora`).
        progress: show a progress bar while downloading.
        max_chars: cut the text to at most this many characters.

    Raises:
        CharnnError: see :func:`build_corpus`.
    """
    entry = get_corpus(name)
    _check_max_chars(max_chars)
    if entry.kind == "builtin":
        builder = _BUILDERS.get(entry.name)
        if builder is None:
            raise CharnnError(f"corpus {name!r} has no builder in this version of charnn")
        text = builder(max_chars)
    elif entry.kind == "download":
        path = fetch_corpus(name, progress=progress)
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise CharnnError(f"corpus {name!r} at {path} is not UTF-8 text ({e})") from None
        text = text.replace("\r\n", "\n")
    else:
        raise CharnnError(f"corpus {name!r} has unknown kind {entry.kind!r}")
    if max_chars is not None:
        text = text[:max_chars]
    if not text:
        raise CharnnError(f"corpus {name!r} came out empty")
    return text


class OutputExistsError(CharnnError):
    """:func:`build_corpus` was asked to write over an existing file without ``overwrite=True``.

    ``path`` is that file; the message names the Python argument (the CLI words it as ``--force``).
    """

    def __init__(self, path: Path):
        super().__init__(f"{path} already exists; pass overwrite=True to replace it")
        self.path = path


def _write_atomically(text: str, out_path: Path, overwrite: bool) -> None:
    parent = out_path.parent
    tmp_name = None
    try:
        fd, tmp_name = tempfile.mkstemp(dir=parent, prefix=f".{out_path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_name, 0o666 & ~umask)
        if not overwrite and out_path.exists():  # it appeared while the corpus was being built
            raise OutputExistsError(out_path)
        os.replace(tmp_name, out_path)
        tmp_name = None
    except OSError as e:
        raise CharnnError(f"cannot write {out_path} ({e.strerror or e}); give an output path in a folder you can "
                          "write") from None
    finally:
        _unlink_quietly(tmp_name)


def build_corpus(
    name: str,
    out_path: str | os.PathLike,
    *,
    progress: bool = True,
    max_chars: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Build corpus ``name`` into the UTF-8 text file ``out_path``.

    Builtin corpora are generated offline; download corpora are fetched into
    the cache (or reused from it) and copied. The output is written atomically,
    so it either appears complete or not at all. Missing parent directories
    are created.

    Args:
        name: a catalogue name (see :func:`list_corpora`).
        out_path: the file to write.
        progress: show a progress bar on stderr while downloading.
        max_chars: cut the corpus to at most this many characters.
        overwrite: replace ``out_path`` if it exists (CLI ``--force``).

    Returns:
        ``out_path`` as a :class:`~pathlib.Path`.

    Raises:
        CharnnError: unknown name (the message lists the known names), an
            existing output without ``overwrite`` (:class:`OutputExistsError`), a bad ``max_chars``, a failed
            download, or an unwritable output.
    """
    out_path = Path(out_path)
    get_corpus(name)  # unknown names fail before touching the filesystem
    _check_max_chars(max_chars)
    check_output_file(out_path, "the corpus")
    if out_path.exists() and not overwrite:
        raise OutputExistsError(out_path)
    text = corpus_text(name, progress=progress, max_chars=max_chars)
    make_dirs(out_path.parent, "an output path")
    _write_atomically(text, out_path, overwrite)
    return out_path


def text_stats(path: str | os.PathLike) -> dict:
    """``{"chars": ..., "distinct": ..., "bytes": ...}`` for a UTF-8 text file."""
    path = Path(path)
    data = path.read_bytes()
    text = data.decode("utf-8", errors="replace")
    return {"chars": len(text), "distinct": len(set(text)), "bytes": len(data)}
