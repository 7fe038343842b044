"""The explore web app: routes only; every answer comes from cnnlab.explore.service (which calls the library).

Safety: the app serves the one run it was started with; clients send images, never file paths. Bad requests get
a 4xx JSON {"error": "..."}; anything unexpected is a 500 JSON answer, and the server keeps running.
"""

from __future__ import annotations

import logging
from importlib.resources import files
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from cnnlab.engine.inference import LoadedRun
from cnnlab.errors import CnnlabError
from cnnlab.explore.service import MAX_UPLOAD_BYTES, Explorer, TooLarge

STATIC = files("cnnlab.explore") / "static"
MAX_BODY = MAX_UPLOAD_BYTES * 4 // 3 + 64 * 1024  # base64 of the largest upload, plus the JSON around it
log = logging.getLogger("cnnlab.explore")


class ImageRequest(BaseModel):
    """An image as a data URL (or base64), or the index of a test image of the run."""

    image: str | None = None
    test_index: int | None = Field(default=None, ge=0)
    center: bool = False  # MNIST-style centring of a drawn digit
    top_k: int = Field(default=5, ge=1, le=100)


class ExplainRequest(ImageRequest):
    """One pixel of one conv layer's map."""

    layer: str
    channel: int = Field(ge=0)
    x: int = Field(ge=0)
    y: int = Field(ge=0)


class KernelRequest(BaseModel):
    """A kernel (name or matrix text) and optional pooling on an uploaded image, or the sample photo."""

    image: str | None = None
    kernel: str = Field(default="", max_length=10_000)
    pool: str | None = Field(default=None, pattern="^(max|avg)$")
    size: int = Field(default=2, ge=1, le=64)
    mode: str = Field(default="clip", pattern="^(clip|abs|normalize)$")
    gray: bool = False


def create_app(loaded: LoadedRun | None) -> FastAPI:
    """The app for one run (or none: then only the kernel playground works)."""
    app = FastAPI(title="cnnlab explore", docs_url=None, redoc_url=None, openapi_url=None)
    explorer = Explorer(loaded)

    @app.middleware("http")
    async def limit_body(request: Request, call_next: Any) -> Response:
        size = request.headers.get("content-length")
        if size is not None and (not size.isdigit() or int(size) > MAX_BODY):
            return JSONResponse({"error": f"request body over {MAX_BODY:,} bytes"}, status_code=413)
        return await call_next(request)

    @app.exception_handler(TooLarge)
    async def too_large(request: Request, e: TooLarge) -> JSONResponse:
        return JSONResponse({"error": str(e)}, status_code=413)

    @app.exception_handler(CnnlabError)
    async def bad_input(request: Request, e: CnnlabError) -> JSONResponse:
        return JSONResponse({"error": str(e)}, status_code=400)

    @app.exception_handler(LookupError)
    async def not_found(request: Request, e: LookupError) -> JSONResponse:
        return JSONResponse({"error": str(e).strip("'\"")}, status_code=404)

    @app.exception_handler(RequestValidationError)
    async def malformed(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return JSONResponse({"error": f"malformed request: {where or 'body'}: {first.get('msg', 'invalid')}"}, 422)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception) -> JSONResponse:
        log.exception("explore: unexpected error on %s", request.url.path)
        return JSONResponse({"error": f"internal error: {type(e).__name__}: {e}"}, status_code=500)

    @app.get("/")
    def index() -> FileResponse:
        return FileResponse(str(STATIC / "index.html"), media_type="text/html")

    @app.get("/api/info")
    def info() -> dict[str, Any]:
        return explorer.info()

    @app.post("/api/predict")
    def predict(req: ImageRequest) -> dict[str, Any]:
        return explorer.predict(req.image, req.test_index, req.center, req.top_k)

    @app.post("/api/explain")
    def explain(req: ExplainRequest) -> dict[str, Any]:
        return explorer.explain(req.image, req.test_index, req.center, req.layer, req.channel, req.x, req.y)

    @app.get("/api/kernel-weights")
    def kernel_weights(layer: str, channel: int = 0) -> dict[str, Any]:
        return explorer.kernel_weights(layer, channel)

    @app.post("/api/kernel")
    def kernel(req: KernelRequest) -> dict[str, Any]:
        return explorer.playground(req.image, req.kernel, req.pool, req.size, req.mode, req.gray)

    @app.get("/api/summary")
    def summary() -> dict[str, Any]:
        return explorer.summary()

    @app.get("/api/picture/{what}")
    def picture(what: str) -> Response:
        return Response(explorer.picture(what), media_type="image/png")

    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")
    return app
