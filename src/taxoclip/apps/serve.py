"""`taxoclip serve`: a web page for field use and the JSON API it calls.

  GET  /              the page: choose or drop photos, see the top species with confidence bars,
                      the lineage and the deepest confident rank
  GET  /api/info      the model: classes, threshold, limits
  POST /api/predict   multipart field ``files`` (one or more photos) -> predictions as JSON
  POST /api/ask       with ``--ask VQA_MODEL``: multipart ``file`` (one photo), ``question`` and
                      optional ``choices`` (comma-separated) -> the answer (and the choices ranked)

Bad uploads get a 4xx with a message and never stop the server: too many files (413), a file over
the size limit (413), empty (400), not an image (415), too many pixels (413). The model runs one
batch at a time behind a lock, so concurrent requests queue instead of oversubscribing the CPU.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from fastapi import FastAPI, Form, HTTPException, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse
from PIL import Image

from taxoclip.data.images import BadImage, check_image, decode_image
from taxoclip.errors import TaxoclipError
from taxoclip.inference.predict import Predictor

MAX_FILE_BYTES = 10 * 1024 * 1024
MAX_FILES = 8
MAX_PIXELS = 40_000_000  # ~ 7,700 x 5,200; larger "photos" are refused before decoding

PAGE = Path(__file__).with_name("static") / "index.html"


def read_upload(upload: UploadFile, max_file_bytes: int) -> Image.Image:
    """The decoded photo of one upload, or the 4xx that says what is wrong with it."""
    data = upload.file.read(max_file_bytes + 1)
    name = upload.filename or "photo"
    if len(data) > max_file_bytes:
        raise HTTPException(413, f"{name}: larger than {max_file_bytes // (1024 * 1024)} MB")
    if not data:
        raise HTTPException(400, f"{name}: empty file")
    try:
        check_image(data)
        return decode_image(data)
    except BadImage as error:
        status = 413 if "pixels" in str(error) else 415
        raise HTTPException(status, f"{name}: {error}") from None


def create_app(
    predictor: Predictor,
    *,
    model_name: str = "",
    top_k: int = 5,
    max_file_bytes: int = MAX_FILE_BYTES,
    max_files: int = MAX_FILES,
    asker=None,
):
    """The app; ``asker`` (a `taxoclip.models.vqa.Asker`) adds /api/ask and the page's question box."""
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS  # PIL raises on anything over twice this; warns over it
    app = FastAPI(title="taxoclip", docs_url="/api/docs", openapi_url="/api/openapi.json")
    lock = threading.Lock()
    page = PAGE.read_text()

    @app.exception_handler(HTTPException)
    async def explain(request: Request, error: HTTPException):  # a plain {"error": "..."} for the page
        return JSONResponse({"error": error.detail}, status_code=error.status_code)

    app.add_middleware(
        BodyGuard,
        limit=max_files * max_file_bytes + 1024 * 1024,
        what=f"{max_files} photos of {max_file_bytes} bytes each",
    )

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return page

    @app.get("/api/info")
    def info() -> dict:
        return {
            "model": model_name,
            "classes": len(predictor.classes),
            "threshold": predictor.threshold,
            "max_file_bytes": max_file_bytes,
            "max_files": max_files,
            "top_k": top_k,
            "ask": asker is not None,
        }

    @app.post("/api/predict")
    def predict(files: list[UploadFile], request: Request, rank: str | None = None) -> dict:
        length = int(request.headers.get("content-length") or 0)
        if length > max_files * max_file_bytes + 1024 * 1024:
            raise HTTPException(
                413,
                f"request too large ({length} bytes); at most {max_files} photos of "
                f"{max_file_bytes // (1024 * 1024)} MB each",
            )
        if len(files) > max_files:
            raise HTTPException(413, f"{len(files)} photos in one request; send at most {max_files}")
        images = [read_upload(upload, max_file_bytes) for upload in files]
        names = [upload.filename or "photo" for upload in files]
        with lock:
            try:
                predictions = predictor.predict_images(images, names, top_k=top_k, rank=rank)
            except Exception as error:  # a user's bad --rank, say: answer, keep serving
                raise HTTPException(400, str(error)) from None
        return {"results": [p.to_json() for p in predictions]}

    @app.post("/api/ask")
    def ask(file: UploadFile, question: str = Form(""), choices: str = Form("")) -> dict:
        if asker is None:
            raise HTTPException(404, "this server answers no questions; start it with --ask VQA_MODEL_DIR")
        from taxoclip.models.vqa import check_question, parse_choices

        question = question.strip()
        try:  # every field bounded before the photo is decoded or the model runs
            options = parse_choices(choices)
            check_question(question, options)
        except TaxoclipError as error:
            raise HTTPException(400, str(error)) from None
        image = read_upload(file, max_file_bytes)
        with lock:
            return {"source": file.filename or "photo"} | asker.ask(image, question, options)

    return app


BODY_TIMEOUT = 30.0  # seconds a request body may pause before the connection is answered and freed


class BodyGuard:
    """ASGI middleware bounding what a request body costs: a declared length over ``limit`` is
    refused (413) before a byte is read; a body without one (chunked) is counted as it arrives and
    cut off (413) once over ``limit``, so at most that much is ever spooled; a body that stops
    arriving for ``timeout`` seconds is answered 408, freeing the connection."""

    def __init__(self, app, limit: int, what: str = "", timeout: float = BODY_TIMEOUT):
        self.app, self.limit, self.what, self.timeout = app, limit, what, timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            return await self.refuse(send, 413, f"request too large ({int(declared)} bytes); at most {self.what}")
        received, complete, started = 0, False, False

        async def guarded_receive():
            nonlocal received, complete
            if complete:  # the body is in: later calls wait for a disconnect, with no deadline
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.timeout)
            except TimeoutError:
                raise HTTPException(408, f"the request body stopped arriving for {self.timeout:g} s") from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                complete = not message.get("more_body", False)
                if received > self.limit:
                    raise HTTPException(413, f"request too large (over {self.limit} bytes); at most {self.what}")
            return message

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, guarded_receive, tracking_send)
        except HTTPException as error:  # raised outside a route (e.g. while FastAPI reads a form)
            if started:
                raise
            await self.refuse(send, error.status_code, error.detail)

    @staticmethod
    async def refuse(send, status: int, message: str) -> None:
        response = JSONResponse({"error": message}, status_code=status, headers={"connection": "close"})
        await send({"type": "http.response.start", "status": status, "headers": response.raw_headers})
        await send({"type": "http.response.body", "body": response.body})


def serve(predictor: Predictor, *, host: str = "127.0.0.1", port: int = 8000, model_name: str = "", asker=None) -> None:
    import uvicorn

    app = create_app(predictor, model_name=model_name, asker=asker)
    uvicorn.run(app, host=host, port=port, log_level="info")
