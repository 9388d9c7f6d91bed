"""Tests for charnn.corpora and `charnn corpus`; all offline (downloads use a local server)."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import re
import socket
import stat
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner

from charnn import corpora
from charnn.cli import main
from charnn.corpora import CorpusEntry, build_corpus, list_corpora
from charnn.errors import CharnnError

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
HEADER = re.compile(r"^# ---- (.+\.py) ----$", re.M)
TEST_DIRS = {"test", "tests", "idle_test"}


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """Every test gets its own empty download cache."""
    monkeypatch.setenv("CHARNN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "corpora"


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def leftovers(directory: Path) -> list[str]:
    """Temporary files a build or download might have left behind."""
    if not directory.exists():
        return []
    return [p.name for p in directory.iterdir() if p.name.startswith(".")]


# ---------------------------------------------------------------------------
# catalogue


def test_catalogue_entries_are_complete():
    entries = list_corpora()
    names = [e.name for e in entries]
    assert {"tinyshakespeare", "python-docs", "python-stdlib"} <= set(names)
    assert len(names) == len(set(names))
    for e in entries:
        assert e.description and e.licence
        assert e.kind in ("builtin", "download")
        if e.kind == "download":
            assert e.url.startswith("https://")
            assert re.fullmatch(r"[0-9a-f]{64}", e.sha256)
        json.dumps(e.to_dict())


def test_tinyshakespeare_recipe():
    e = corpora.get_corpus("tinyshakespeare")
    assert e.url == (
        "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
    )
    assert e.size_chars == 1_115_394


def test_tinyshakespeare_sha_matches_shared_copy():
    path = SHARED / "corpora" / "tinyshakespeare.txt"
    if not path.is_file():
        pytest.skip(f"shared copy of tiny Shakespeare not found at {path}")
    data = path.read_bytes()
    e = corpora.get_corpus("tinyshakespeare")
    assert hashlib.sha256(data).hexdigest() == e.sha256
    assert len(data.decode("utf-8")) == e.size_chars


def test_unknown_name_lists_known_names(tmp_path):
    out = tmp_path / "x.txt"
    with pytest.raises(CharnnError) as info:
        build_corpus("no-such-corpus", out)
    msg = str(info.value)
    assert "no-such-corpus" in msg and "\n" not in msg
    for name in corpora.CATALOGUE:
        assert name in msg
    assert not out.exists()


# ---------------------------------------------------------------------------
# offline builders


def test_python_docs_builds_deterministically(tmp_path):
    pytest.importorskip("pydoc_data.topics")
    a = build_corpus("python-docs", tmp_path / "a.txt")
    b = build_corpus("python-docs", tmp_path / "b.txt")
    assert a == tmp_path / "a.txt"
    assert a.read_bytes() == b.read_bytes()
    text = read(a)
    assert len(text) > 100_000
    assert len(set(text)) > 60
    assert "assert" in text and "\r" not in text
    assert leftovers(tmp_path) == []


def test_python_docs_without_pydoc_data(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "pydoc_data.topics", None)  # makes the import fail
    with pytest.raises(CharnnError, match="pydoc_data"):
        build_corpus("python-docs", tmp_path / "d.txt")
    assert not (tmp_path / "d.txt").exists()


def test_python_stdlib_builds_deterministically_without_tests(tmp_path):
    a = build_corpus("python-stdlib", tmp_path / "a.txt")
    b = build_corpus("python-stdlib", tmp_path / "b.txt")
    assert a.read_bytes() == b.read_bytes()
    text = read(a)
    assert len(text) > 1_000_000
    assert len(set(text)) > 90
    paths = HEADER.findall(text)
    assert len(paths) > 100
    assert "os.py" in paths and "collections/__init__.py" in paths
    assert paths == sorted(paths)
    for p in paths:
        parts = p.split("/")
        assert not TEST_DIRS & set(parts[:-1]), p
        assert not parts[-1].startswith("test_"), p
        assert "site-packages" not in parts and "dist-packages" not in parts, p


def test_python_stdlib_skips_tests_and_non_utf8(tmp_path):
    root = tmp_path / "lib"
    (root / "pkg" / "tests").mkdir(parents=True)
    (root / "test").mkdir()
    (root / "idlelib" / "idle_test").mkdir(parents=True)
    (root / "site-packages" / "thirdparty").mkdir(parents=True)
    (root / "b.py").write_text("b = 2\n")
    (root / "a.py").write_bytes(b"a = 1\r\n")
    (root / "latin1.py").write_bytes(b"s = '\xe9'\n")
    (root / "notes.txt").write_text("not python\n")
    (root / "pkg" / "mod.py").write_text("m = 3")
    (root / "pkg" / "tests" / "t.py").write_text("bad\n")
    (root / "test" / "t.py").write_text("bad\n")
    (root / "idlelib" / "idle_test" / "t.py").write_text("bad\n")
    (root / "site-packages" / "thirdparty" / "x.py").write_text("bad\n")
    text = corpora.python_stdlib_text(root=root)
    assert text == (
        "# ---- a.py ----\na = 1\n\n"
        "# ---- b.py ----\nb = 2\n\n"
        "# ---- pkg/mod.py ----\nm = 3\n\n"
    )
    assert corpora.python_stdlib_text(10, root=root) == text[:10]


def test_max_chars_caps_output(tmp_path):
    out = build_corpus("python-stdlib", tmp_path / "s.txt", max_chars=5000)
    text = read(out)
    assert len(text) == 5000
    assert text.startswith("# ---- ")
    with pytest.raises(CharnnError, match="max_chars"):
        build_corpus("python-stdlib", tmp_path / "t.txt", max_chars=0)


def test_refuses_to_overwrite_without_flag(tmp_path):
    out = tmp_path / "out.txt"
    out.write_text("keep me\n")
    with pytest.raises(CharnnError) as e:
        build_corpus("python-stdlib", out, max_chars=100)
    assert str(e.value) == f"{out} already exists; pass overwrite=True to replace it"  # the API's word, not the CLI's
    assert read(out) == "keep me\n"
    build_corpus("python-stdlib", out, max_chars=100, overwrite=True)
    assert len(read(out)) == 100
    assert leftovers(tmp_path) == []


def test_creates_missing_parent_directories(tmp_path):
    out = build_corpus("python-stdlib", tmp_path / "a" / "b" / "s.txt", max_chars=50)
    assert len(read(out)) == 50


# ---------------------------------------------------------------------------
# CLI


def invoke(*args):
    return CliRunner().invoke(main, list(args))


def test_cli_list_table():
    r = invoke("corpus", "list")
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[0].split()[:3] == ["NAME", "KIND", "SIZE"]
    for e in list_corpora():
        assert any(line.startswith(e.name + " ") for line in lines), e.name
    assert "1.1M chars" in r.output


def test_cli_list_json():
    r = invoke("corpus", "list", "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert list(data) == ["corpora"]
    by_name = {c["name"]: c for c in data["corpora"]}
    assert set(by_name) == set(corpora.CATALOGUE)
    ts = by_name["tinyshakespeare"]
    assert ts["kind"] == "download" and ts["sha256"] == corpora.CATALOGUE["tinyshakespeare"].sha256
    assert by_name["python-docs"]["kind"] == "builtin"


def test_cli_build(tmp_path):
    out = tmp_path / "docs.txt"
    r = invoke("corpus", "build", "python-stdlib", "-o", str(out), "--max-chars", "2000")
    assert r.exit_code == 0, r.output
    assert len(read(out)) == 2000
    assert str(out) in r.output and "2,000 chars" in r.output and "distinct" in r.output
    again = invoke("corpus", "build", "python-stdlib", "-o", str(out), "--max-chars", "2000", "--force", "--json")
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout) == {"corpus": "python-stdlib", "path": str(out), "chars": 2000,
                                        "distinct": len(set(read(out)))}


def test_cli_unknown_name(tmp_path):
    out = tmp_path / "x.txt"
    r = invoke("corpus", "build", "nope", "--output", str(out))
    assert r.exit_code == 2
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown corpus 'nope'")
    assert "python-docs" in lines[0]
    assert "Traceback" not in r.output
    assert r.exception is None or isinstance(r.exception, SystemExit)
    assert not out.exists()


def test_cli_existing_output_needs_force(tmp_path):
    out = tmp_path / "x.txt"
    out.write_text("old\n")
    r = invoke("corpus", "build", "python-stdlib", "-o", str(out), "--max-chars", "300")
    assert r.exit_code == 2
    assert r.output == f"error: {out} already exists; pass --force to replace it\n"  # the CLI's word only
    assert read(out) == "old\n"
    r = invoke("corpus", "build", "python-stdlib", "-o", str(out), "--max-chars", "300", "--force")
    assert r.exit_code == 0, r.output
    assert len(read(out)) == 300


def test_cli_force_never_replaces_a_pipe_or_device(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    r = invoke("corpus", "build", "python-stdlib", "-o", str(fifo), "--max-chars", "300", "--force")
    assert r.exit_code == 2
    assert r.output == f"error: {fifo} is not a regular file (a device, pipe or socket); give a file name for the corpus\n"
    assert stat.S_ISFIFO(fifo.stat().st_mode) and leftovers(tmp_path) == []


def test_cli_unwritable_output_names_the_fix(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder\n")
    r = invoke("corpus", "build", "python-stdlib", "-o", str(blocker / "x.txt"), "--max-chars", "300")
    assert r.exit_code == 2
    assert r.output.startswith(f"error: cannot create directory {blocker} (") and r.output.count("\n") == 1
    assert r.output.endswith("; give an output path in a folder you can write\n")

    def refused(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    with pytest.MonkeyPatch.context() as m:  # root may write anywhere, so the refusal is simulated
        m.setattr(corpora.tempfile, "mkstemp", refused)
        r = invoke("corpus", "build", "python-stdlib", "-o", str(tmp_path / "y.txt"), "--max-chars", "300")
    assert r.exit_code == 2
    assert r.output == (f"error: cannot write {tmp_path / 'y.txt'} (Permission denied); "
                        "give an output path in a folder you can write\n")
    assert leftovers(tmp_path) == []


def test_cli_output_appearing_during_the_build_still_names_force(tmp_path, monkeypatch):
    out = tmp_path / "x.txt"
    real = corpora.corpus_text

    def meanwhile(*args, **kwargs):
        out.write_text("written meanwhile\n", encoding="utf-8")  # caught by the check before the final rename
        return real(*args, **kwargs)

    monkeypatch.setattr(corpora, "corpus_text", meanwhile)
    r = invoke("corpus", "build", "python-stdlib", "-o", str(out), "--max-chars", "300")
    assert r.exit_code == 2
    assert r.output == f"error: {out} already exists; pass --force to replace it\n"
    assert read(out) == "written meanwhile\n" and leftovers(tmp_path) == []


def test_cli_bad_max_chars(tmp_path):
    r = invoke("corpus", "build", "python-stdlib", "-o", str(tmp_path / "x"), "--max-chars", "0")
    assert r.exit_code != 0
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------
# downloads, against a local HTTP server


class _Handler(http.server.SimpleHTTPRequestHandler):
    requests: list[str] = []

    def do_GET(self):
        type(self).requests.append(self.path)
        super().do_GET()

    def log_message(self, *args):  # keep test output clean
        pass


@pytest.fixture
def server(tmp_path):
    """Serve tmp_path/srv on 127.0.0.1; yields (base_url, served_dir, request_log)."""
    root = tmp_path / "srv"
    root.mkdir()
    handler = type("Handler", (_Handler,), {"requests": []})
    httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), lambda *a, **k: handler(*a, directory=str(root), **k)
    )
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", root, handler.requests
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def _recipe(monkeypatch, url: str, sha: str) -> None:
    entry = CorpusEntry(
        name="testcorpus", description="test only", licence="CC0", kind="download",
        url=url, sha256=sha,
    )
    monkeypatch.setitem(corpora.CATALOGUE, "testcorpus", entry)


def _payload() -> bytes:
    lines = [f"line {i}: the quick brown fox jumps over the lazy dog — ünïcödé\n" for i in range(2000)]
    return "".join(lines).encode("utf-8")


def test_download_builds_and_caches(tmp_path, monkeypatch, server, cache):
    base, root, log = server
    data = _payload()
    (root / "corpus.txt").write_bytes(data)
    _recipe(monkeypatch, f"{base}/corpus.txt", hashlib.sha256(data).hexdigest())

    out = build_corpus("testcorpus", tmp_path / "a.txt", progress=False)
    assert out.read_bytes() == data
    assert log == ["/corpus.txt"]
    cached = cache / "testcorpus.txt"
    assert cached.read_bytes() == data
    assert leftovers(cache) == []

    # second build: served from the cache, the server is not asked again
    out2 = build_corpus("testcorpus", tmp_path / "b.txt", progress=False, max_chars=10)
    assert read(out2) == data.decode("utf-8")[:10]
    assert log == ["/corpus.txt"]

    # a corrupted cache entry is detected and fetched again
    cached.write_bytes(b"garbage")
    build_corpus("testcorpus", tmp_path / "c.txt", progress=False)
    assert cached.read_bytes() == data and len(log) == 2


def test_download_with_progress_bar_via_cli(tmp_path, monkeypatch, server, cache):
    base, root, _ = server
    data = _payload()
    (root / "corpus.txt").write_bytes(data)
    _recipe(monkeypatch, f"{base}/corpus.txt", hashlib.sha256(data).hexdigest())
    out = tmp_path / "o.txt"
    r = invoke("corpus", "build", "testcorpus", "-o", str(out))
    assert r.exit_code == 0, r.output
    assert out.read_bytes() == data
    assert f"{len(data.decode('utf-8')):,} chars" in r.output


def test_download_sha_mismatch_caches_nothing(tmp_path, monkeypatch, server, cache):
    base, root, _ = server
    (root / "corpus.txt").write_bytes(_payload())
    _recipe(monkeypatch, f"{base}/corpus.txt", "0" * 64)
    out = tmp_path / "a.txt"
    with pytest.raises(CharnnError) as info:
        build_corpus("testcorpus", out, progress=False)
    msg = str(info.value)
    assert "SHA-256" in msg and "testcorpus" in msg and "\n" not in msg
    assert not out.exists()
    assert not cache.exists() or list(cache.iterdir()) == []
    assert leftovers(tmp_path) == []


def test_download_http_error(tmp_path, monkeypatch, server, cache):
    base, _, _ = server
    _recipe(monkeypatch, f"{base}/missing.txt", "0" * 64)
    out = tmp_path / "a.txt"
    r = invoke("corpus", "build", "testcorpus", "-o", str(out))
    assert r.exit_code == 2
    lines = r.output.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: could not download testcorpus from ")
    assert "404" in lines[0] and "charnn train" in lines[0]
    assert not out.exists()
    assert not cache.exists() or list(cache.iterdir()) == []


def test_download_unreachable(tmp_path, monkeypatch, cache):
    with socket.socket() as s:  # find a port, then close it so nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/corpus.txt"
    _recipe(monkeypatch, url, "0" * 64)
    out = tmp_path / "a.txt"
    with pytest.raises(CharnnError) as info:
        build_corpus("testcorpus", out, progress=False)
    msg = str(info.value)
    assert msg.startswith(f"could not download testcorpus from {url} (")
    assert "check your connection" in msg and "\n" not in msg
    assert not out.exists()
    assert not cache.exists() or list(cache.iterdir()) == []


def test_cli_output_dash_is_refused_not_a_file_named_dash(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = invoke("corpus", "build", "python-stdlib", "-o", "-", "--max-chars", "300")
    assert r.exit_code == 2 and r.output.startswith("error: --output - (standard output) is not supported")
    assert not (tmp_path / "-").exists()
