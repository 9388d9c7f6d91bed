"""An HTTP API and a web page for a trained model (``charnn serve``; needs the ``serve`` extra).

``create_app(path_or_model)`` builds a FastAPI application::

    POST /v1/complete         {text, k, mode, max_chars}   -> suggestions
    POST /v1/generate         {seed, length, temperature, top_k, top_p, random_seed} -> text
    POST /v1/generate/stream  the same, as server-sent events: data: {"text": "..."} per chunk
    POST /v1/score            {text}                       -> bits per character
    GET  /v1/model            the model and the server's limits
    GET  /healthz             liveness
    GET  /                    a web page: live suggestions in a text area, Tab accepts; a generate box
    GET  /openapi.json, /docs the OpenAPI schema and its browser

Every request is validated against its schema (types are strict, numbers
have ranges, texts have the configured maximum length): bad input answers
422 with a JSON body, a body not sent as JSON (content-type:
application/json) answers 415, a request body larger than the limits allow
answers 413, and no request can take the process down. The model is loaded once
and shared by all requests; the completer is thread-safe.
"""

import contextlib
import errno
import json
import logging
import math
import socket
import threading
import time
import weakref
from importlib import resources
from pathlib import Path
from typing import Callable, Iterator, Literal

from .completion import MODES, Completer
from .errors import SEED_LIMIT, CharnnError, setting

log = logging.getLogger("charnn.serve")

DEFAULT_MAX_TEXT_CHARS = 20_000
DEFAULT_MAX_GENERATE_CHARS = 2_000
BODY_ERRORS = {413: {"description": "The request body is larger than the server's limits allow."},
               415: {"description": "The body is not sent as JSON: send it with content-type: application/json."}}
BUSY = {503: {"description": "Every generation slot is taken: retry after the Retry-After header's seconds."}}
DEFAULT_MAX_GENERATIONS = 4
MAX_K = 10
MAX_SUGGESTION_CHARS = 128
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _require_fastapi():
    try:
        import fastapi  # noqa: F401,PLC0415
    except ImportError as e:
        raise CharnnError("the server needs FastAPI and uvicorn; install them with: pip install 'charnn[serve]'") from e


def _load(model):
    """A loaded language model from a path (None: the latest run) or a model already loaded."""
    if model is None or isinstance(model, (str, Path)):
        from .lm import load  # noqa: PLC0415

        return load(model)
    return model


def page_html() -> str:
    """The web page served at ``/``."""
    return resources.files("charnn").joinpath("web/index.html").read_text(encoding="utf-8")


def create_app(model=None, *, max_text_chars: int = DEFAULT_MAX_TEXT_CHARS,
               max_generate_chars: int = DEFAULT_MAX_GENERATE_CHARS, completer: Completer | None = None,
               completer_options: dict | None = None, max_generations: int = DEFAULT_MAX_GENERATIONS):
    """The ASGI application serving ``model`` (a checkpoint path, None for the latest run, or ``charnn.load(...)``).

    ``max_text_chars`` bounds every input text (completion context, seed,
    scored text); ``max_generate_chars`` bounds a generation's length;
    ``max_generations`` bounds the generations and scorings running at once
    (more get 503 with Retry-After), so long requests cannot starve the
    keystroke-sized completions.
    """
    _require_fastapi()
    from fastapi import FastAPI  # noqa: PLC0415
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse  # noqa: PLC0415

    from pydantic import BaseModel, ConfigDict, Field  # noqa: PLC0415

    from . import __version__  # noqa: PLC0415

    class SlotStream(StreamingResponse):
        """A stream that gives its generation slot back when the response ends however it ends: finished,
        or the client gone (a suspended generator is not closed then, so its own ``finally`` cannot be relied on)."""

        def __init__(self, content, release: Callable[[], None], **kwargs):
            super().__init__(content, **kwargs)
            self.release = release

        async def __call__(self, scope, receive, send) -> None:
            try:
                await super().__call__(scope, receive, send)
            finally:
                self.release()

    if max_text_chars < 1 or max_generate_chars < 1 or max_generations < 1:
        raise CharnnError(f"{setting('max_text_chars')}, {setting('max_generate_chars')} and {setting('max_generations')} "
                          "must be positive")
    slots = threading.BoundedSemaphore(max_generations)
    lm = _load(model)
    completer = completer or Completer(lm, **(completer_options or {}))
    started = time.time()

    strict = ConfigDict(extra="forbid", strict=True)

    class CompleteRequest(BaseModel):
        model_config = strict
        text: str = Field(max_length=max_text_chars, description="The text so far; suggestions continue it.")
        k: int = Field(3, ge=1, le=MAX_K, description="How many suggestions.")
        mode: Literal["word", "phrase", "line"] = Field("word", description="word, phrase or line.")
        max_chars: int = Field(32, ge=1, le=MAX_SUGGESTION_CHARS, description="Longest suggestion.")

    class SuggestionOut(BaseModel):
        text: str
        probability: float
        score: float
        complete: bool

    class CompleteResponse(BaseModel):
        suggestions: list[SuggestionOut]
        mode: str
        elapsed_ms: float

    class GenerateRequest(BaseModel):
        model_config = strict
        seed: str = Field("", max_length=max_text_chars, description="Text to continue.")
        length: int = Field(200, ge=1, le=max_generate_chars, description="Characters to generate.")
        temperature: float = Field(1.0, ge=0, le=10, allow_inf_nan=False, description="0 is greedy; higher is wilder.")
        top_k: int | None = Field(None, ge=1, le=len(completer.vocab), description="Sample from the k likeliest.")
        top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False, description="Nucleus sampling.")
        random_seed: int | None = Field(None, ge=0, lt=SEED_LIMIT, description="Same seed, same text.")

    class GenerateResponse(BaseModel):
        text: str
        seed: str
        chars: int
        elapsed_ms: float

    class ScoreRequest(BaseModel):
        model_config = strict
        text: str = Field(min_length=1, max_length=max_text_chars)

    app = FastAPI(title="charnn", version=__version__,
                  description="Autocomplete, generation and scoring with a character-level language model.")
    app.state.lm, app.state.completer = lm, completer
    _install_error_handlers(app, JSONResponse)
    app.add_middleware(BodyLimit, max_bytes=12 * max_text_chars + 4096)

    def sampling(req) -> dict:
        return dict(length=req.length, temperature=req.temperature, top_k=req.top_k, top_p=req.top_p,
                    random_seed=req.random_seed)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index():
        return HTMLResponse(page_html())

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok", "uptime_s": round(time.time() - started, 3)}

    @app.get("/v1/model")
    def model_info() -> dict:
        return {**_model_info(lm, completer), "limits": {
            "max_text_chars": max_text_chars, "max_generate_chars": max_generate_chars, "max_generations": max_generations,
            "max_k": MAX_K,
            "max_suggestion_chars": MAX_SUGGESTION_CHARS, "modes": list(MODES)}}

    @app.post("/v1/complete", response_model=CompleteResponse, responses=BODY_ERRORS)
    def complete(req: CompleteRequest):
        t0 = time.perf_counter()
        found = completer.suggest(req.text, k=req.k, mode=req.mode, max_chars=req.max_chars)
        return {"suggestions": [s.to_dict() for s in found], "mode": req.mode,
                "elapsed_ms": (time.perf_counter() - t0) * 1e3}

    def take_slot() -> Callable[[], None]:
        """A generation slot, or Busy; returns its release, safe to call more than once."""
        if not slots.acquire(blocking=False):
            raise Busy(max_generations)
        return _once(slots.release)

    @contextlib.contextmanager
    def slot():
        release = take_slot()
        try:
            yield
        finally:
            release()

    @app.exception_handler(Busy)
    async def busy(request, exc: Busy):
        return JSONResponse({"detail": str(exc)}, status_code=503, headers={"Retry-After": "1"})

    @app.post("/v1/generate", response_model=GenerateResponse, responses={**BODY_ERRORS, **BUSY})
    def generate(req: GenerateRequest):
        t0 = time.perf_counter()
        with slot():
            text = lm.generate(req.seed, **sampling(req))
        return {"text": text, "seed": req.seed, "chars": len(text), "elapsed_ms": (time.perf_counter() - t0) * 1e3}

    @app.post("/v1/generate/stream", response_class=StreamingResponse,
              responses={200: {"content": {"text/event-stream": {}},
                               "description": 'Server-sent events: `data: {"text": CHUNK}` per chunk, then `event: end`.'},
                         **BODY_ERRORS, **BUSY})
    def generate_stream(req: GenerateRequest):
        release = take_slot()  # held until the stream ends, or until it is dropped before it starts
        try:
            run = lm.sampler(req.seed, **sampling(req))  # built now, so bad options answer 422 before streaming
        except BaseException:
            release()
            raise
        events = _events((piece for _, piece in run), on_end=release)
        weakref.finalize(events, release)  # a response that is never sent
        return SlotStream(events, release, media_type="text/event-stream",
                          headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    @app.post("/v1/score", responses={**BODY_ERRORS, **BUSY})
    def score(req: ScoreRequest) -> dict:
        """Bits per character of ``text`` (after a newline) and every character's log-probability (nats)."""
        with slot():
            result = lm.score(req.text)
        return {"chars": result.chars, "bpc": _finite(result.bpc), "nats_per_char": _finite(result.nats_per_char),
                "total_logprob": _finite(result.total_logprob), "logprobs": [_finite(x) for x in result.logprobs.tolist()]}

    return app


def _once(fn: Callable[[], None]) -> Callable[[], None]:
    """``fn`` wrapped so that only its first call, from any thread, runs it."""
    lock, done = threading.Lock(), []

    def call() -> None:
        with lock:
            if done:
                return
            done.append(True)
        fn()

    return call


class Busy(Exception):
    """Every generation slot is taken."""

    def __init__(self, slots: int):
        super().__init__(f"busy: {slots} generations or scorings are already running; retry in a moment")


def _events(chunks: Iterator[str], on_end: Callable[[], None] = lambda: None) -> Iterator[str]:
    """Server-sent events from text chunks; an error ends the stream with an ``error`` event.

    ``on_end`` runs however the stream ends: finished, failed, or dropped by the client.
    """
    total = 0
    try:
        for chunk in chunks:
            total += len(chunk)
            yield f"data: {json.dumps({'text': chunk}, ensure_ascii=False)}\n\n"
    except Exception as e:  # noqa: BLE001 (the headers are sent: the error can only go in the stream)
        log.exception("generation stream failed")
        yield f"event: error\ndata: {json.dumps({'detail': str(e) if isinstance(e, CharnnError) else 'internal error'})}\n\n"
        return
    finally:
        on_end()
    yield f"event: end\ndata: {json.dumps({'chars': total})}\n\n"


def _finite(x: float):
    """JSON has no NaN or infinity: those become null."""
    return x if math.isfinite(x) else None


def _model_info(lm, completer: Completer) -> dict:
    model = completer.model
    config = getattr(model, "config", None)
    info = {
        "vocab_size": len(completer.vocab), "chars": "".join(completer.vocab.chars[1:]),
        "parameters": model.num_parameters() if hasattr(model, "num_parameters") else None,
        "model": config.to_dict() if hasattr(config, "to_dict") else None,
        "device": str(completer.device), "completer": completer.info(),
    }
    path = getattr(lm, "checkpoint_path", None)
    info["checkpoint"] = str(path) if path is not None else None
    return info


def _install_error_handlers(app, JSONResponse) -> None:
    """Schema violations, unreadable bodies and CharnnError (bad input the schema cannot see) -> 422; anything else
    -> a JSON 500, logged."""

    from fastapi.exceptions import RequestValidationError  # noqa: PLC0415

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        if request.method == "POST" and not _is_json(request.headers.get("content-type", "")):
            return JSONResponse({"detail": "the request body must be JSON: send it with content-type: application/json"},
                                status_code=415)
        # FastAPI's own handler echoes the input back, which cannot be encoded when it is NaN or infinite
        detail = [{"type": e.get("type"), "loc": [str(part) for part in e.get("loc", ())], "msg": e.get("msg")}
                  for e in exc.errors()]
        return JSONResponse({"detail": detail}, status_code=422)

    from fastapi.exception_handlers import http_exception_handler  # noqa: PLC0415
    from starlette.exceptions import HTTPException  # noqa: PLC0415

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        if exc.status_code == 400:  # FastAPI's "error parsing the body": bytes that are not UTF-8, nesting too deep
            return JSONResponse({"detail": "the request body is not readable JSON: send UTF-8 JSON text (not nested "
                                           "hundreds of levels deep)"}, status_code=422)
        return await http_exception_handler(request, exc)  # 404, 405, ... as FastAPI answers them

    @app.exception_handler(CharnnError)
    async def user_error(request, exc: CharnnError):
        return JSONResponse({"detail": str(exc)}, status_code=422)

    @app.exception_handler(Exception)
    async def unexpected(request, exc: Exception):
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": "internal error"}, status_code=500)


def _is_json(content_type: str) -> bool:
    """Whether a content-type header names JSON (application/json, or a +json type), whatever its parameters."""
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


class BodyLimit:
    """ASGI middleware: refuse request bodies over ``max_bytes`` with 413 before the application reads them."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await self._refuse(send)
        body, more = [], True
        size = 0
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                return await self._refuse(send)
            body.append(message.get("body", b""))
            more = message.get("more_body", False)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(body), "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    async def _refuse(self, send):
        payload = json.dumps({"detail": f"request body too large (limit {self.max_bytes} bytes)"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})


def bind_sockets(host: str = "127.0.0.1", port: int = 8000) -> list[socket.socket]:
    """Listening sockets on every address ``host`` resolves to, at ``port`` (0: a free one).

    Bound and listening at once, so the port is ours from here on (connections
    made while the model loads wait in the backlog) and a port that is taken
    fails now, with a :class:`CharnnError` naming the fix, not after the server
    has announced itself.
    """
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as e:
        reason = getattr(e, "strerror", None) or e
        raise CharnnError(f"cannot listen on {host}: it does not resolve ({reason}); "
                          f"pass another {setting('host')}, e.g. 127.0.0.1") from None
    sockets: list[socket.socket] = []
    seen, skipped = set(), None
    for family, kind, proto, _, address in infos:
        if (family, address[:2]) in seen:
            continue
        seen.add((family, address[:2]))
        if sockets:  # --port 0: every address gets the port the first one was given
            address = (address[0], sockets[0].getsockname()[1], *address[2:])
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn and asyncio do
            if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen()
        except OSError as e:
            sock.close()
            if e.errno == errno.EADDRNOTAVAIL:  # this family is not configured here (asyncio skips it too)
                skipped = e
                continue
            for s in sockets:
                s.close()
            raise _bind_error(e, host, port) from None
        sock.set_inheritable(True)
        sockets.append(sock)
    if not sockets:
        raise _bind_error(skipped or OSError(errno.EADDRNOTAVAIL, "no address"), host, port)
    return sockets


def _bind_error(e: OSError, host: str, port: int) -> CharnnError:
    host_name, port_name = setting("host"), setting("port")
    if e.errno == errno.EADDRINUSE:
        return CharnnError(f"port {port} on {host} is in use; pass another {port_name} (or stop what is using it)")
    if e.errno == errno.EACCES:
        return CharnnError(f"port {port} on {host} is not allowed for this user (ports below 1024 usually need "
                           f"privileges); pass another {port_name}, e.g. 8000")
    if e.errno == errno.EADDRNOTAVAIL:
        return CharnnError(f"cannot listen on {host}: it is not an address of this machine; "
                           f"pass another {host_name}, e.g. 127.0.0.1")
    return CharnnError(f"cannot listen on port {port} of {host} ({e.strerror or e}); "
                       f"pass another {port_name} or {host_name}")


def url(sockets: list[socket.socket], host: str) -> str:
    """The address a browser can use for the server listening on ``sockets`` (bound for ``host``)."""
    shown = host or "0.0.0.0"
    if ":" in shown:
        shown = f"[{shown}]"
    return f"http://{shown}:{sockets[0].getsockname()[1]}/"


def serve(model=None, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning",
          sockets: list[socket.socket] | None = None, **app_options) -> None:
    """Run the application with uvicorn until interrupted.

    The port is bound (see :func:`bind_sockets`) before the model is loaded, so a
    taken port raises :class:`CharnnError` at once; ``sockets`` from
    :func:`bind_sockets` serve instead of ``host`` and ``port``.
    """
    _require_fastapi()
    import uvicorn  # noqa: PLC0415

    own = sockets is None
    sockets = bind_sockets(host, port) if own else sockets
    try:
        app = create_app(model, **app_options)
        server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level))
        try:
            server.run(sockets=sockets)  # uvicorn serves on these and binds nothing itself
        except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled, after shutting down
            pass
    finally:
        if own:
            for sock in sockets:
                sock.close()
