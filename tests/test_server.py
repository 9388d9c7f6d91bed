"""The HTTP API: every endpoint, validation (422), limits, streaming, OpenAPI, and survival of bad requests."""

from __future__ import annotations

import contextlib
import json
import threading
import warnings

import pytest

pytest.importorskip("fastapi", reason="the server needs the serve extra: pip install 'charnn[serve]'")
pytest.importorskip("httpx", reason="the API tests need httpx (the test extra)")

with warnings.catch_warnings():  # Starlette's notice that its test client will move from httpx to httpx2
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient  # noqa: E402

from charnn.serving import create_app  # noqa: E402

MAX_TEXT, MAX_GENERATE = 500, 120


@pytest.fixture(scope="module")
def app(tiny_run):
    return create_app(tiny_run, max_text_chars=MAX_TEXT, max_generate_chars=MAX_GENERATE)


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app) as c:
        yield c


def sse_events(body: str) -> list[tuple[str, dict]]:
    events = []
    for block in body.strip().split("\n\n"):
        kind, data = "message", None
        for line in block.splitlines():
            if line.startswith("event: "):
                kind = line[len("event: "):]
            elif line.startswith("data: "):
                data = json.loads(line[len("data: "):])
        events.append((kind, data))
    return events


# -- endpoints ---------------------------------------------------------------------------------
def test_healthz_and_model_info(client, tiny_run):
    assert client.get("/healthz").json()["status"] == "ok"
    info = client.get("/v1/model").json()
    assert info["vocab_size"] > 10 and info["parameters"] > 0 and info["model"]["cell"] == "lstm"
    assert info["limits"]["max_text_chars"] == MAX_TEXT and info["limits"]["max_generate_chars"] == MAX_GENERATE
    assert info["limits"]["max_generations"] >= 1  # the third limit the README names
    assert info["completer"]["context_chars"] > 0


def test_complete_returns_the_completers_suggestions(client, app):
    r = client.post("/v1/complete", json={"text": "The interpreter reads a li", "k": 3, "mode": "word"})
    assert r.status_code == 200
    body = r.json()
    expected = app.state.completer.suggest("The interpreter reads a li", k=3)
    assert [s["text"] for s in body["suggestions"]] == [s.text for s in expected]
    assert [s["probability"] for s in body["suggestions"]] == pytest.approx([s.probability for s in expected])
    assert body["mode"] == "word" and body["elapsed_ms"] >= 0
    line = client.post("/v1/complete", json={"text": "A line", "mode": "line", "k": 2, "max_chars": 10}).json()
    assert len(line["suggestions"]) <= 2 and all(len(s["text"]) <= 10 and "\n" not in s["text"] for s in line["suggestions"])
    assert client.post("/v1/complete", json={"text": ""}).status_code == 200  # defaults; empty text is fine


def test_generate_is_reproducible_with_a_random_seed(client, app):
    req = {"seed": "The ", "length": 40, "temperature": 0.8, "top_k": 10, "top_p": 0.95, "random_seed": 7}
    a, b = client.post("/v1/generate", json=req).json(), client.post("/v1/generate", json=req).json()
    assert a["text"] == b["text"] and a["chars"] == len(a["text"]) == 40
    assert a["text"] == app.state.lm.generate("The ", length=40, temperature=0.8, top_k=10, top_p=0.95, random_seed=7)
    assert client.post("/v1/generate", json={"length": 5}).status_code == 200  # every other field has a default


def test_generate_stream_sends_the_same_text_as_events(client):
    req = {"seed": "The ", "length": 50, "temperature": 1.0, "random_seed": 3}
    whole = client.post("/v1/generate", json=req).json()["text"]
    with client.stream("POST", "/v1/generate/stream", json=req) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        body = "".join(r.iter_text())
    events = sse_events(body)
    assert events[-1] == ("end", {"chars": 50})
    assert "".join(d["text"] for kind, d in events if kind == "message") == whole


def test_score_reports_bits_per_character(client, app):
    text = "The interpreter reads a line of input."
    r = client.post("/v1/score", json={"text": text})
    assert r.status_code == 200
    body, expected = r.json(), app.state.lm.score(text)
    assert body["chars"] == len(text) == len(body["logprobs"])
    assert body["bpc"] == pytest.approx(expected.bpc) and 0 < body["bpc"] < 8
    assert sum(body["logprobs"]) == pytest.approx(body["total_logprob"])


def test_greedy_generation_is_temperature_zero(client):
    a = client.post("/v1/generate", json={"seed": "The ", "length": 30, "temperature": 0}).json()["text"]
    b = client.post("/v1/generate", json={"seed": "The ", "length": 30, "temperature": 0, "random_seed": 99}).json()["text"]
    assert a == b and len(a) == 30


def test_openapi_schema_and_page(client):
    schema = client.get("/openapi.json").json()
    for path in ("/v1/complete", "/v1/generate", "/v1/generate/stream", "/v1/score", "/v1/model", "/healthz"):
        assert path in schema["paths"], path
    for path in ("/v1/complete", "/v1/generate", "/v1/generate/stream", "/v1/score"):
        documented = schema["paths"][path]["post"]["responses"]
        assert {"200", "413", "415", "422"} <= set(documented), (path, sorted(documented))
        assert ("503" in documented) == (path != "/v1/complete"), path  # completions never wait for a slot
    props = schema["components"]["schemas"]["CompleteRequest"]["properties"]
    assert props["text"]["maxLength"] == MAX_TEXT and props["k"]["maximum"] == 10
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="editor"' in page.text and 'id="temperature"' in page.text


# -- bad input ------------------------------------------------------------------------------
BAD = [
    ("/v1/complete", {"k": 3}),  # text missing
    ("/v1/complete", {"text": 5}),
    ("/v1/complete", {"text": "a", "k": "3"}),
    ("/v1/complete", {"text": "a", "k": True}),
    ("/v1/complete", {"text": "a", "k": 0}),
    ("/v1/complete", {"text": "a", "k": 11}),
    ("/v1/complete", {"text": "a", "k": 2.5}),
    ("/v1/complete", {"text": "a", "mode": "sentence"}),
    ("/v1/complete", {"text": "a", "max_chars": 0}),
    ("/v1/complete", {"text": "a", "extra": 1}),
    ("/v1/complete", {"text": "x" * (MAX_TEXT + 1)}),
    ("/v1/complete", ["not", "an", "object"]),
    ("/v1/generate", {"length": 0}),
    ("/v1/generate", {"length": MAX_GENERATE + 1}),
    ("/v1/generate", {"temperature": -1}),
    ("/v1/generate", {"temperature": "hot"}),
    ("/v1/generate", {"top_k": 0}),
    ("/v1/generate", {"top_k": 100000}),
    ("/v1/generate", {"top_p": 0}),
    ("/v1/generate", {"top_p": 1.5}),
    ("/v1/generate", {"random_seed": -1}),
    ("/v1/generate", {"random_seed": 2**70}),
    ("/v1/generate", {"seed": "x" * (MAX_TEXT + 1)}),
    ("/v1/generate/stream", {"length": 0}),
    ("/v1/score", {"text": ""}),
    ("/v1/score", {"text": "x" * (MAX_TEXT + 1)}),
    ("/v1/score", {}),
]


@pytest.mark.parametrize("path, body", BAD)
def test_bad_requests_answer_422_json(client, path, body):
    r = client.post(path, json=body)
    assert r.status_code == 422, r.text
    assert r.headers["content-type"].startswith("application/json") and "detail" in r.json()


@pytest.mark.parametrize("raw", [b"{not json", b'{"text": "a", "k": NaN}', b'{"text": "a", "k": Infinity}', b"", b"\xff\xfe",
                                 b'{"text": "\\ud800"}', b'{"text": "a", "mode": null}', b"[1, 2]", b"null",
                                 b'{"text": "caf\xe9"}', b"[" * 5_000])  # not UTF-8, too deep: FastAPI said 400
def test_malformed_bodies_answer_422(client, raw):
    for path in ("/v1/complete", "/v1/generate"):
        r = client.post(path, content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 422, (path, raw, r.text)


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
def test_a_body_not_sent_as_json_answers_415_naming_the_header(client, content_type):
    headers = {"content-type": content_type} if content_type else {}
    for path in ("/v1/complete", "/v1/generate", "/v1/generate/stream", "/v1/score"):
        r = client.post(path, content=b'{"text": "a"}' if content_type != "application/x-www-form-urlencoded" else b"text=a",
                        headers=headers)
        assert r.status_code == 415, (path, r.status_code, r.text)
        assert "content-type: application/json" in r.json()["detail"]


def test_a_json_body_with_charset_or_a_json_suffix_is_read(client):
    for content_type in ("application/json; charset=utf-8", "application/vnd.api+json"):
        r = client.post("/v1/complete", content=b'{"text": "The "}', headers={"content-type": content_type})
        assert r.status_code == 200, (content_type, r.text)


def test_generate_temperature_nan_is_refused(client):
    r = client.post("/v1/generate", content=b'{"temperature": NaN}', headers={"content-type": "application/json"})
    assert r.status_code == 422


def test_oversized_bodies_answer_413_and_the_server_lives_on(client):
    r = client.post("/v1/complete", content=b'{"text": "' + b"x" * 100_000 + b'"}', headers={"content-type": "application/json"})
    assert r.status_code == 413 and "too large" in r.json()["detail"]

    def chunks():
        for _ in range(50):
            yield b"x" * 10_000

    r = client.post("/v1/complete", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert client.get("/healthz").status_code == 200


@pytest.mark.filterwarnings("ignore::charnn.sampling.UnknownCharacterWarning")
def test_random_requests_never_cause_a_server_error(client):
    """A seeded fuzz of field values and types: every answer is 200, 413 or 422, and the server stays up."""
    import random

    rng = random.Random(0)
    values = [None, True, False, 0, 1, -1, 3, 10, 2**63, -(2**70), 0.5, 1e308, -0.0, "", "a", "word", "line", "é\u0000\n",
              "x" * 600, [], [1], {}, {"a": 1}]
    fields = {"/v1/complete": ["text", "k", "mode", "max_chars"], "/v1/score": ["text"],
              "/v1/generate": ["seed", "length", "temperature", "top_k", "top_p", "random_seed"]}
    for _ in range(150):
        path = rng.choice(list(fields))
        body = {f: rng.choice(values) for f in fields[path] if rng.random() < 0.7}
        if rng.random() < 0.1:
            body["unexpected"] = 1
        r = client.post(path, json=body)
        assert r.status_code in (200, 422), (path, body, r.status_code, r.text)
        assert isinstance(r.json(), dict)
    assert client.get("/healthz").status_code == 200


def test_unknown_routes_and_methods(client):
    assert client.get("/v1/nothing").status_code == 404
    assert client.get("/v1/complete").status_code == 405


def test_an_internal_error_is_a_json_500_and_the_app_keeps_serving(tiny_run, app):
    broken = create_app(app.state.lm, completer=app.state.completer)

    def fail(*args, **kwargs):
        raise RuntimeError("boom")

    with TestClient(broken, raise_server_exceptions=False) as c:
        original = app.state.completer.suggest
        app.state.completer.suggest = fail
        try:
            r = c.post("/v1/complete", json={"text": "a"})
        finally:
            app.state.completer.suggest = original
        assert r.status_code == 500 and r.json() == {"detail": "internal error"}
        assert c.post("/v1/complete", json={"text": "a"}).status_code == 200


def test_concurrent_clients_get_consistent_answers(client, app):
    texts = [f"The interpreter reads {w}" for w in ("a", "the", "one", "lines", "input", "some")]
    expected = {t: [s.text for s in app.state.completer.suggest(t)] for t in texts}
    failures = []

    def worker(t):
        for _ in range(5):
            r = client.post("/v1/complete", json={"text": t})
            if r.status_code != 200 or [s["text"] for s in r.json()["suggestions"]] != expected[t]:
                failures.append((t, r.status_code))

    threads = [threading.Thread(target=worker, args=(t,)) for t in texts]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not failures


@contextlib.contextmanager
def running_server(tiny_run, *options):
    """``charnn serve`` in a subprocess on a free loopback port: yields (process, base URL) once it answers, then
    stops it with Ctrl-C (its stderr is left in ``process.err``)."""
    import signal
    import socket
    import subprocess
    import sys
    import time
    from pathlib import Path

    import httpx

    script = Path(sys.executable).with_name("charnn")
    if not script.exists():
        pytest.skip("the charnn console script is not installed (pip install -e .)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([str(script), "serve", str(tiny_run), "--port", str(port), *options],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                httpx.get(f"{base}/healthz", timeout=5)
                break
            except httpx.TransportError:
                assert time.time() < deadline, "charnn serve did not come up"
                time.sleep(0.2)
        yield proc, base
    finally:
        proc.send_signal(signal.SIGINT)
        _, proc.err = proc.communicate(timeout=30)


def test_serve_command_listens_on_loopback_and_stops_on_ctrl_c(tiny_run):
    import signal

    import httpx

    with running_server(tiny_run, "--log-level", "warning") as (proc, base):
        r = httpx.post(f"{base}/v1/complete", json={"text": "The inter"}, timeout=5)
        assert r.status_code == 200 and r.json()["suggestions"]
        assert httpx.post(f"{base}/v1/complete", json={"text": 1}, timeout=5).status_code == 422
    assert proc.returncode in (0, -signal.SIGINT, 130)
    assert f"{base}/" in proc.err


def test_generations_beyond_the_limit_get_503_while_completions_go_on(tiny_run):
    app = create_app(tiny_run, max_generations=1)
    client = TestClient(app)
    started, release = threading.Event(), threading.Event()
    real = app.state.lm.generate

    def slow(*args, **kwargs):
        started.set()
        release.wait(30)
        return real(*args, **kwargs)

    app.state.lm.generate = slow
    first = threading.Thread(target=lambda: client.post("/v1/generate", json={"seed": "a", "length": 5}))
    first.start()
    try:
        assert started.wait(30)
        busy = client.post("/v1/generate", json={"seed": "a", "length": 5})
        assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
        assert "busy" in busy.json()["detail"]
        assert client.post("/v1/score", json={"text": "abc"}).status_code == 503
        assert client.post("/v1/generate/stream", json={"seed": "a", "length": 5}).status_code == 503
        assert client.post("/v1/complete", json={"text": "abc"}).status_code == 200
    finally:
        release.set()
        first.join()
    app.state.lm.generate = real
    streamed = client.post("/v1/generate/stream", json={"seed": "a", "length": 5})
    assert streamed.status_code == 200 and "event: end" in streamed.text
    assert client.post("/v1/generate", json={"seed": "a", "length": 5}).status_code == 200  # the stream gave its slot back


def test_a_stream_the_client_drops_gives_its_slot_back(tiny_run):
    """A real server: the client reads one event of a long stream and hangs up; the one slot must come back."""
    import time

    import httpx

    with running_server(tiny_run, "--max-generations", "1", "--max-generate-chars", "100000") as (_, base):
        with httpx.stream("POST", f"{base}/v1/generate/stream", json={"seed": "a", "length": 100000}, timeout=30) as r:
            assert r.status_code == 200
            next(r.iter_raw())  # one event, then the client hangs up
        codes = []
        for _ in range(8):  # the server notices the hang-up within moments (generating the rest takes seconds)
            codes.append(httpx.post(f"{base}/v1/generate", json={"seed": "a", "length": 5}, timeout=30).status_code)
            if codes[-1] == 200:
                break
            time.sleep(0.2)
        assert codes[-1] == 200, codes


# -- binding the port ----------------------------------------------------------------------------


@pytest.fixture
def busy_port():
    """A port on 127.0.0.1 that another socket is listening on."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def test_serve_command_on_a_busy_port_is_one_error_line_before_any_announcement(tiny_run, busy_port):
    from click.testing import CliRunner

    from charnn.cli import main

    result = CliRunner().invoke(main, ["serve", str(tiny_run), "--port", str(busy_port), "--log-level", "warning"])
    assert result.exit_code == 2, result.output
    assert result.output == f"error: port {busy_port} on 127.0.0.1 is in use; pass another --port (or stop what is using it)\n"


def test_serve_function_on_a_busy_port_raises_before_loading_and_names_the_argument(busy_port):
    from charnn.errors import CharnnError
    from charnn.serving import serve

    with pytest.raises(CharnnError, match=f"port {busy_port} on 127.0.0.1 is in use; pass another port ") as e:
        serve("no-such-checkpoint", port=busy_port)  # the port is checked first: the missing checkpoint is not reached
    assert "--port" not in str(e.value)


def test_bind_sockets_listens_at_once_and_resolves_port_zero():
    import socket

    from charnn.errors import CharnnError, cli_wording
    from charnn.serving import bind_sockets, url

    sockets = bind_sockets("127.0.0.1", 0)
    try:
        port = sockets[0].getsockname()[1]
        assert port and url(sockets, "127.0.0.1") == f"http://127.0.0.1:{port}/"
        socket.create_connection(("127.0.0.1", port), timeout=5).close()  # listening before uvicorn starts
        with pytest.raises(CharnnError, match="is in use; pass another port "):
            bind_sockets("127.0.0.1", port)
        with cli_wording(), pytest.raises(CharnnError, match="is in use; pass another --port "):
            bind_sockets("127.0.0.1", port)
    finally:
        for s in sockets:
            s.close()
    with pytest.raises(CharnnError, match="does not resolve.*pass another host, "):
        bind_sockets("no-such-host.invalid", 0)
    with cli_wording(), pytest.raises(CharnnError, match="does not resolve.*pass another --host, "):
        bind_sockets("no-such-host.invalid", 0)
