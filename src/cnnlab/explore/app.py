"""The explore web app: routes only; every answer comes from cnnlab.explore.service (which calls the library).

Safety:
- the app serves the one run it was started with; clients send images, kernel names and numbers, never file paths;
- it answers only requests whose Host header is an address it listens on, so a web page that rebinds its own DNS
  name to 127.0.0.1 cannot read from it (DNS rebinding); no CORS headers, so other origins cannot read answers;
- request bodies are counted as they stream in (Content-Length or chunked) and cut off at MAX_BODY with a 413;
- one request computes at a time, and each one's work is bounded (image pixels, kernel multiply-adds).
Every error is a JSON {"error": "..."}: 4xx for bad requests, 500 for anything unexpected, and the server keeps
running.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Collection
from importlib.resources import files
from typing import Annotated, Any, Literal, TypeVar

from fastapi import Body, FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cnnlab.engine.inference import LoadedRun
from cnnlab.errors import CnnlabError
from cnnlab.explore.service import MAX_UPLOAD_BYTES, Explorer, TooLarge
from cnnlab.kernels import short

STATIC = files("cnnlab.explore") / "static"
MAX_BODY = MAX_UPLOAD_BYTES * 4 // 3 + 64 * 1024  # base64 of the largest upload, plus the JSON around it
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")  # the default: loopback names, any port
SECURITY_HEADERS = [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
                    (b"referrer-policy", b"no-referrer")]  # fmt: skip
log = logging.getLogger("cnnlab.explore")
T = TypeVar("T")


class ErrorBody(BaseModel):
    """Every error answer: one line saying what was wrong."""

    error: str


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": what}
    for code, what in ((400, "bad request"), (404, "no such thing"), (413, "body or image too large"),
                       (422, "malformed request"))
}  # fmt: skip


# A 1x1 black PNG: the example image of the API schema (and a first input for the schema-driven fuzz test).
TINY_PNG = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAAAAAA6fptVAAAACklEQVR4nGNgAAAAAgABSK+kcQAAAABJRU5ErkJggg=="
)


class ImageRequest(BaseModel):
    """An image as a data URL (or base64), or the index of a test image of the run."""

    model_config = ConfigDict(strict=True)  # the schema's types exactly: `"center": 0` is refused, not read as false
    image: str | None = None
    test_index: int | None = Field(default=None, ge=0)
    center: bool = False  # MNIST-style centring of a drawn digit
    top_k: int = Field(default=5, ge=1, le=100)


class PredictRequest(ImageRequest):
    """An image, and the colour scale of its maps: one per map, per layer, or one for every layer."""

    scale: Literal["map", "layer", "global"] = "layer"


class ExplainRequest(ImageRequest):
    """One pixel of one conv (or pooling) layer's map."""

    layer: str = Field(max_length=200)
    channel: int = Field(ge=0)
    x: int = Field(ge=0)
    y: int = Field(ge=0)


class KernelRequest(BaseModel):
    """A kernel (name or matrix text) and optional pooling on an uploaded image, or the sample photo."""

    model_config = ConfigDict(strict=True)
    image: str | None = None
    kernel: str = Field(default="", max_length=10_000)
    pool: str | None = Field(default=None, pattern="^(max|avg)$")
    size: int = Field(default=2, ge=1, le=64)
    mode: str = Field(default="clip", pattern="^(clip|abs|normalize)$")
    gray: bool = False


class KernelPixelRequest(BaseModel):
    """One output pixel of the playground (column x, row y of the filtered image, before any pooling)."""

    model_config = ConfigDict(strict=True)
    image: str | None = None
    kernel: str = Field(default="", max_length=10_000)
    mode: str = Field(default="clip", pattern="^(clip|abs|normalize)$")
    gray: bool = False
    x: int = Field(ge=0)
    y: int = Field(ge=0)


def _examples(*bodies: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Request examples for the API schema (the schema-driven fuzz test starts from them)."""
    return {f"example {i + 1}": {"value": body} for i, body in enumerate(bodies)}


def split_host(host: str) -> tuple[str, str]:
    """'name:port' / '[v6]:port' / 'name' -> (name, port or ''), lower case."""
    host = host.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        if end < 0:
            return host, ""
        rest = host[end + 1 :]
        return host[: end + 1], rest[1:] if rest.startswith(":") else ""
    name, _, port = host.partition(":")
    return name, port


def host_allowed(host: str, allowed: Collection[str]) -> bool:
    """Whether a Host header names this server: an entry 'name:port' matches exactly, 'name' any port, '*' all."""
    if "*" in allowed:
        return True
    name, port = split_host(host)
    if not name:
        return False
    for entry in allowed:
        e_name, e_port = split_host(entry)
        if e_name == name and (not e_port or e_port == port or (not port and e_port == "80")):
            return True
    return False


async def _send_error(send: Send, status: int, message: str) -> None:
    """Answer {"error": message} directly from a middleware, and close the connection afterwards."""
    body = JSONResponse({"error": message}).body
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close")]  # fmt: skip
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class HostGuard:
    """Refuse (400) any request whose Host header is not an address this server listens on; add safety headers."""

    def __init__(self, app: ASGIApp, allowed: Collection[str]) -> None:
        self.app, self.allowed = app, tuple(allowed)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """ASGI entry point."""
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        started = False

        async def send_with_headers(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        host = Headers(scope=scope).get("host", "")
        if host_allowed(host, self.allowed):
            try:
                return await self.app(scope, receive, send_with_headers)
            except asyncio.CancelledError:  # the server is stopping (Ctrl-C) while this request waits or computes
                if not started and scope["type"] == "http":
                    await _send_error(send_with_headers, 503, "the server is stopping")
                raise
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008})
        where = ", ".join(self.allowed)
        await _send_error(send_with_headers, 400, f"host {short(host)} is not this server's address (answers {where})")


class _BodyTooLarge(StarletteHTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body over {limit:,} bytes")


class BodyLimit:
    """Cut a request body off at `limit` bytes while it streams in, chunked or not, and answer 413.

    Reading stops at the limit: the app sees an error instead of the next chunk, the 413 says `Connection: close`,
    and the server closes the connection without buffering the rest.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """ASGI entry point."""
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = Headers(scope=scope).get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await _send_error(send, 413, f"request body over {self.limit:,} bytes")
        received = 0
        over = started = answered = False

        async def limited_receive() -> Message:
            nonlocal received, over
            if over:
                raise _BodyTooLarge(self.limit)
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    over = True
                    raise _BodyTooLarge(self.limit)
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started, answered
            if over and not started:  # whatever the app answers to the error, the answer is our 413
                if not answered:
                    answered = True
                    await _send_error(send, 413, f"request body over {self.limit:,} bytes")
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not over:  # over the limit, whatever the app raised while its body was cut off becomes the 413
                raise
        if over and not answered and not started:
            await _send_error(send, 413, f"request body over {self.limit:,} bytes")


def create_app(loaded: LoadedRun | None, *, allowed_hosts: Collection[str] = LOOPBACK_HOSTS) -> FastAPI:
    """The app for one run (or none: then only the kernel playground works).

    `allowed_hosts`: the Host headers answered: 'name:port' exactly, 'name' on any port, '*' any (a server that
    listens on every interface). The default is the loopback names; a test client sending Host `testserver` must
    say so.
    """
    app = FastAPI(title="cnnlab explore", docs_url=None, redoc_url=None, openapi_url=None)
    explorer = Explorer(loaded)
    app.state.explorer = explorer
    busy = threading.Lock()  # one computation at a time: a burst of requests queues instead of multiplying memory

    def compute(fn: Callable[..., T], *args: Any) -> T:
        with busy:
            return fn(*args)

    app.add_middleware(BodyLimit, limit=MAX_BODY)
    app.add_middleware(HostGuard, allowed=tuple(allowed_hosts))

    @app.exception_handler(TooLarge)
    async def too_large(request: Request, e: TooLarge) -> JSONResponse:
        return JSONResponse({"error": str(e)}, status_code=413)

    @app.exception_handler(CnnlabError)
    async def bad_input(request: Request, e: CnnlabError) -> JSONResponse:
        return JSONResponse({"error": str(e)}, status_code=400)

    @app.exception_handler(LookupError)
    async def not_found(request: Request, e: LookupError) -> JSONResponse:
        return JSONResponse({"error": str(e).strip("'\"")}, status_code=404)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        if e.status_code == 404:
            message = f"not found: {short(request.url.path)}"
        elif e.status_code == 405:
            message = f"method {short(request.method, 10)} not allowed on {short(request.url.path)}"
        else:
            message = str(e.detail)
        return JSONResponse({"error": message}, status_code=e.status_code, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def malformed(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return JSONResponse({"error": f"malformed request: {short(where or 'body')}: {first.get('msg', 'invalid')}"},
                            422)  # fmt: skip

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception) -> JSONResponse:
        log.exception("explore: unexpected error on %s", request.url.path)
        return JSONResponse({"error": f"internal error ({type(e).__name__}); the server log has the details"}, 500)

    @app.get("/", response_class=FileResponse, responses={200: {"content": {"text/html": {}}}})
    def index() -> FileResponse:
        return FileResponse(str(STATIC / "index.html"), media_type="text/html")

    @app.get("/favicon.ico", response_class=FileResponse, responses={200: {"content": {"image/svg+xml": {}}}})
    def favicon() -> FileResponse:
        return FileResponse(str(STATIC / "favicon.svg"), media_type="image/svg+xml")

    @app.get("/api/info", responses=ERRORS)
    def info() -> dict[str, Any]:
        return compute(explorer.info)

    @app.post("/api/predict", responses=ERRORS)
    def predict(req: Annotated[PredictRequest, Body(openapi_examples=_examples(
        {"test_index": 0, "top_k": 3},
        {"image": TINY_PNG, "center": True, "scale": "global"}))]) -> dict[str, Any]:  # fmt: skip
        return compute(explorer.predict, req.image, req.test_index, req.center, req.top_k, req.scale)

    @app.post("/api/pipeline", responses=ERRORS)
    def pipeline(req: Annotated[PredictRequest, Body(openapi_examples=_examples(
            {"test_index": 0}, {"image": TINY_PNG, "center": True, "scale": "map"}))]) -> dict[str, Any]:  # fmt: skip
        return compute(explorer.pipeline_view, req.image, req.test_index, req.center, req.scale)

    @app.post("/api/explain", responses=ERRORS)
    def explain(req: Annotated[ExplainRequest, Body(openapi_examples=_examples(
        {"test_index": 0, "layer": "features.1", "channel": 0, "x": 3, "y": 4}))]) -> dict[str, Any]:  # fmt: skip
        return compute(explorer.explain, req.image, req.test_index, req.center, req.layer, req.channel, req.x, req.y)

    @app.get("/api/kernel-weights", responses=ERRORS)
    def kernel_weights(layer: Annotated[str, Query(examples=["features.1"])], channel: int = 0) -> dict[str, Any]:
        return compute(explorer.kernel_weights, layer, channel)

    @app.post("/api/kernel", responses=ERRORS)
    def kernel(req: Annotated[KernelRequest, Body(openapi_examples=_examples(
        {"kernel": "sharpen"}, {"kernel": "gaussian:7:1.5", "pool": "max", "size": 4, "gray": True},
        {"image": TINY_PNG, "kernel": "0,-1,0;-1,5,-1;0,-1,0", "mode": "abs"}))]) -> dict[str, Any]:  # fmt: skip
        return compute(explorer.playground, req.image, req.kernel, req.pool, req.size, req.mode, req.gray)

    @app.get("/api/channel", responses=ERRORS)
    def channel(layer: Annotated[str, Query(max_length=200, examples=["features.1"])],
                channel: Annotated[int, Query(ge=0, le=100_000)] = 0) -> dict[str, Any]:  # fmt: skip
        return compute(explorer.channel_view, layer, channel)

    @app.get("/api/confusion", responses=ERRORS)
    def confusion() -> dict[str, Any]:
        return compute(explorer.confusion)

    @app.get("/api/cell", responses=ERRORS)
    def cell(true: Annotated[int, Query(ge=0, le=100_000)], predicted: Annotated[int, Query(ge=0, le=100_000)]
             ) -> dict[str, Any]:  # fmt: skip
        return compute(explorer.cell, true, predicted)

    @app.post("/api/kernel-explain", responses=ERRORS)
    def kernel_explain(req: Annotated[KernelPixelRequest, Body(openapi_examples=_examples(
            {"kernel": "sharpen", "gray": True, "x": 100, "y": 80}))]) -> dict[str, Any]:  # fmt: skip
        return compute(explorer.playground_explain, req.image, req.kernel, req.mode, req.gray, req.x, req.y)

    @app.get("/api/summary", responses=ERRORS)
    def summary() -> dict[str, Any]:
        return compute(explorer.summary)

    @app.get("/api/picture/{what}", response_class=Response,
             responses={**ERRORS, 200: {"content": {"image/png": {}}, "description": "a PNG picture"}})  # fmt: skip
    def picture(what: Annotated[str, Path(examples=["curves"])]) -> Response:
        return Response(compute(explorer.picture, what), media_type="image/png")

    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")
    return app
