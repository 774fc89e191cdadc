"""The page's web layer: a FastAPI app that serves tools/web/ (one hand-written page, no external assets)
and a small JSON API over a :class:`tools.playground.Playground`.

    GET  /                      the page            GET /api/info, /api/health, /api/test_image/{i}
    POST /api/sample            form: label, n, temperature, top_p, cfg_scale, cfg_schedule, seed (, steps: masked;
                                temperature_end: a schedule)
    POST /api/repair            form: image (file) or test_index, mask (PNG), n, temperature, top_p, seed, label
                                (-1: none), cfg_scale (1 unless a label is given) (, steps: masked)
    POST /api/compress          form: image (file)          POST /api/decompress   form: file (.vqz)
    POST /api/anomaly           form: images (files)

Answers are JSON; files inside them are base64 data URLs. A problem the user can fix is HTTP 400 (413 for an
upload over the size limit, 503 when the queue is full) with {"error": "<one line>"}; anything else is a
500 with a one-line message, logged with its traceback, and the server goes on serving. Model work runs on
one worker thread, so concurrent requests queue instead of running the models at once (on a 2-core CPU
two at once would each take twice as long, and the networks' decoding state is not shared-safe).
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import math
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from common.cli import UserError, one_line, out_of_memory
from tools.playground import MAX_IMAGES, Playground
from tools.uploads import MAX_PIXELS, png_bytes, read_mask, read_upload_image

WEB = Path(__file__).with_name("web")
# Nothing from another origin: no fonts, scripts, styles or beacons, whatever a later edit of the page adds.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")  # fmt: skip


class HttpError(UserError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


BODY_TIMEOUT = 30.0  # seconds a client may take to send the next part of its request body
BODY_TOTAL = 300.0  # and to send all of it (one byte every 29 s would otherwise hold the connection for good)


def is_loopback_ip(name: str) -> bool:
    """127.0.0.1, 127.0.0.2, [::1], ...: serve --host may bind any loopback address, and its URL names it."""
    try:
        return ipaddress.ip_address(name.strip("[]")).is_loopback
    except ValueError:
        return False


class Guard:
    """ASGI middleware: security headers on every answer; a request body over `max_bytes` refused with 413,
    by its Content-Length before anything is read, or (chunked uploads) as soon as the bytes read pass it, and
    one that stalls for BODY_TIMEOUT or takes over BODY_TOTAL refused with 408 (a client that never finishes
    held its connection for good). With `loopback_only` (the default bind) a Host header that names no
    loopback address is refused (DNS rebinding: a web page whose name now points at 127.0.0.1 would otherwise
    read the answers), and
    everywhere a POST sent by a page of another origin (its Origin, or Sec-Fetch-Site: cross-site): any web
    page the user opens could otherwise make this server work. (Plain ASGI: Starlette's BaseHTTPMiddleware
    would turn an error raised while reading into a 500.)"""

    HEADERS = [(b"content-security-policy", CSP.encode()), (b"x-content-type-options", b"nosniff"),
               (b"referrer-policy", b"no-referrer"), (b"cache-control", b"no-store")]  # fmt: skip

    def __init__(self, app, max_bytes: int, loopback_only: bool = True) -> None:
        self.app, self.max_bytes, self.loopback_only = app, max_bytes, loopback_only

    def refusal(self, scope) -> str | None:
        """Why this request is not served (a Host or an Origin of another site), or None."""
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers") or []}
        host = headers.get("host", "").lower()
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host  # "[::1]:8000" -> "[::1]"
        if self.loopback_only and name != "localhost" and not is_loopback_ip(name):
            return f"Host {host[:80]!r} is not this server's address (open the page at the URL serve printed)"
        if scope.get("method") == "POST":
            origin = headers.get("origin")
            if headers.get("sec-fetch-site") == "cross-site" or (
                    origin is not None and origin.lower().split("://", 1)[-1] != host):  # fmt: skip
                return "requests from another site's page are refused; use the page serve printed"
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *self.HEADERS]
            await send(message)

        if (why := self.refusal(scope)) is not None:
            return await JSONResponse({"error": why}, status_code=403)(scope, receive, send_with_headers)
        length = dict(scope.get("headers") or []).get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.max_bytes:
            answer = JSONResponse({"error": self.message(length.decode(errors="replace"))}, status_code=413)
            return await answer(scope, receive, send_with_headers)
        seen, start = 0, time.monotonic()

        async def counted():
            nonlocal seen
            left = BODY_TOTAL - (time.monotonic() - start)
            try:
                message = await asyncio.wait_for(receive(), max(0.0, min(BODY_TIMEOUT, left)))
            except asyncio.TimeoutError:
                why = f"stalled for {BODY_TIMEOUT:g} s" if left > BODY_TIMEOUT else f"took over {BODY_TOTAL:g} s"
                raise HttpError(408, f"the request body {why}; send it again") from None
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:  # raised inside the route's form parsing: the HttpError handler answers
                raise HttpError(413, self.message(f"over {self.max_bytes}"))
            return message

        return await self.app(scope, counted, send_with_headers)

    def message(self, length: str) -> str:
        return f"upload too large ({length} bytes); the limit is {self.max_bytes / 1e6:g} MB per request"


class ModelQueue:
    """Runs model work (and the decoding of uploads) on one thread, in arrival order; refuses work when
    `max_waiting` requests already wait, and skips a request whose client has gone by its turn (30 abandoned
    requests of 256 samples each made the next user wait 27 s)."""

    def __init__(self, max_waiting: int) -> None:
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="models")
        self.max_waiting, self.waiting = max_waiting, 0
        self.turn: asyncio.Lock | None = None  # made in the event loop that uses it

    async def run(self, fn, *args, request: Request | None = None):
        if self.waiting >= self.max_waiting:
            raise HttpError(503, f"the server is busy ({self.waiting} requests queued); try again in a moment")
        self.waiting += 1  # only the event loop's thread touches the counter
        self.turn = self.turn or asyncio.Lock()  # FIFO: requests take their turns in arrival order
        try:
            async with self.turn:
                if request is not None and await request.is_disconnected():
                    raise HttpError(400, "the client went away before its turn")  # nobody reads this answer
                t0 = time.perf_counter()
                result = await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)
                return result, time.perf_counter() - t0
        finally:
            self.waiting -= 1


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def class_label(form) -> int | None:
    """The form's class: None for -1 or no field (unconditional); below -1 is refused (it read as none: an API
    client's off-by-one got unconditional samples without a word). Playground refuses a class the prior lacks."""
    label = int(number(form, "label", int, -1))
    if label < -1:
        raise HttpError(400, f"label must be a class id, or -1 for none, got {label}")
    return None if label == -1 else label


def number(form, name: str, kind: type = float, default: float | None = None) -> float:
    """A form field as int or float; 400 naming the field if missing or not a number."""
    raw = form.get(name)
    if raw is None or str(raw).strip() == "":
        if default is None:
            raise HttpError(400, f"{name} is missing")
        return default
    try:
        value = kind(str(raw).strip())
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise HttpError(400, f"{name} must be {what}, got {str(raw)[:40]!r}") from None
    if kind is float and not math.isfinite(value):
        raise HttpError(400, f"{name} must be a finite number, got {raw!r}")
    return value


async def upload(form, name: str) -> tuple[bytes, str]:
    f = form.get(name)
    if f is None or isinstance(f, str):
        raise HttpError(400, f"no file given ({name}); choose a file to upload")
    return await f.read(), f.filename or name


def create_app(play: Playground, max_upload_bytes: int = 10_000_000, max_waiting: int = 64,
               loopback_only: bool = True) -> FastAPI:  # fmt: skip
    """The app; `play` is used from the queue's one worker thread only."""
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None, title="vqgen")  # the docs pages load a CDN
    queue = ModelQueue(max_waiting)
    size, channels = play.m.image_size, play.m.channels
    app.state.queue, app.state.play = queue, play

    @app.exception_handler(HttpError)
    async def http_error(request: Request, e: HttpError):
        return JSONResponse({"error": one_line(e)}, status_code=e.status)

    @app.exception_handler(HTTPException)
    async def starlette_error(request: Request, e: HTTPException):  # e.g. too many files in one form
        return JSONResponse({"error": one_line(e.detail)}, status_code=e.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):  # /api/test_image/abc: a 422 list
        where = ".".join(str(p) for p in (e.errors()[0].get("loc") or [])[1:]) if e.errors() else "request"
        return JSONResponse({"error": f"{where}: {e.errors()[0].get('msg') if e.errors() else 'invalid'}"},
                            status_code=400)  # fmt: skip

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, e: ClientDisconnect):  # nobody to answer; no traceback in the log
        return Response(status_code=400)

    @app.exception_handler(UserError)
    @app.exception_handler(ValueError)
    async def user_error(request: Request, e: Exception):  # what the commands report as user errors
        return JSONResponse({"error": one_line(e)}, status_code=400)

    @app.exception_handler(RuntimeError)
    async def runtime_error(request: Request, e: RuntimeError):
        if (what := out_of_memory(e)) is None:
            raise e  # a bug: the 500 below, with its traceback in the log
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # hand the failed request's blocks back before the next one
        return JSONResponse({"error": f"{what}; ask for fewer images at once"}, status_code=503)

    @app.exception_handler(Exception)
    async def any_error(request: Request, e: Exception):  # Starlette logs the traceback after this answer
        return JSONResponse({"error": f"internal error ({type(e).__name__}: {one_line(e)[:200]}); the server "
                                      "goes on: try other inputs"}, status_code=500)  # fmt: skip

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(WEB / "index.html", media_type="text/html")

    @app.get("/api/info")
    async def info():
        return play.info() | {"max_upload_bytes": max_upload_bytes, "max_pixels": MAX_PIXELS}

    @app.get("/api/health")
    async def health():
        return {"ok": True, "queued": queue.waiting}

    @app.get("/api/test_image/{index}")
    async def test_image(index: int):
        return Response(png_bytes(play.test_image(index)), media_type="image/png")

    async def form_of(request: Request):
        return await request.form(max_files=MAX_IMAGES, max_fields=32)

    @app.post("/api/sample")
    async def sample(request: Request):
        form = await form_of(request)
        end = number(form, "temperature_end", float) if str(form.get("temperature_end") or "").strip() else None
        args = (class_label(form), int(number(form, "n", int, 16)), number(form, "temperature", float, 1.0),
                number(form, "top_p", float, 1.0), number(form, "cfg_scale", float, 1.0), number(form, "seed", int, 0),
                number(form, "steps", int, 0), str(form.get("cfg_schedule") or "linear"), end)
        out, seconds = await queue.run(play.sample, *args, request=request)
        return {"grid": data_url(out["grid"]), "npz": data_url(out["npz"], "application/octet-stream"),
                "n": out["n"], "model_seconds": out["seconds"], "seconds": seconds}  # fmt: skip

    async def image_for_repair(form) -> torch.Tensor:
        if form.get("image") is not None and not isinstance(form.get("image"), str):
            data, name = await upload(form, "image")
            return (await queue.run(read_upload_image, data, name, size, channels))[0]  # decoded in turn
        return play.test_image(int(number(form, "test_index", int)))

    @app.post("/api/repair")
    async def repair(request: Request):
        form = await form_of(request)
        image = await image_for_repair(form)
        mask, _ = await upload(form, "mask")
        painted, _ = await queue.run(read_mask, mask, size)
        args = (image, painted, int(number(form, "n", int, 4)), number(form, "temperature", float, 1.0),
                number(form, "top_p", float, 1.0), number(form, "seed", int, 0), number(form, "steps", int, 0),
                class_label(form), number(form, "cfg_scale", float, 1.0))
        out, seconds = await queue.run(play.repair, *args, request=request)
        return {"original": data_url(out["original"]), "painted": data_url(out["painted"]),
                "repairs": [data_url(r) for r in out["repairs"]], "codes_redrawn": out["codes_redrawn"],
                "codes": out["codes"], "seconds": seconds}  # fmt: skip

    @app.post("/api/compress")
    async def compress(request: Request):
        data, name = await upload(await form_of(request), "image")
        image, _ = await queue.run(read_upload_image, data, name, size, channels, request=request)
        out, seconds = await queue.run(play.compress, image, name, request=request)
        answer = {"original": data_url(out["original"]), "seconds": seconds, "name": Path(name).stem + ".vqz",
                  "vqz": data_url(out["vqz"], "application/octet-stream"),
                  "vq": {**out["vq"], "png": data_url(out["vq"]["png"])}}  # fmt: skip
        for fmt, mime in (("jpeg", "image/jpeg"), ("webp", "image/webp")):
            answer[fmt] = {**out[fmt], "data": data_url(out[fmt]["data"], mime)}
        return answer

    @app.post("/api/decompress")
    async def decompress(request: Request):
        data, name = await upload(await form_of(request), "file")
        out, seconds = await queue.run(play.decompress, data, name, request=request)
        return {"count": out["count"], "bpp": out["bpp"], "images": [data_url(x) for x in out["images"]],
                "names": out["names"], "seconds": seconds}  # fmt: skip

    @app.post("/api/anomaly")
    async def anomaly(request: Request):
        form = await form_of(request)
        files = [f for f in form.getlist("images") if not isinstance(f, str)]
        if not files:
            raise HttpError(400, "no images given; choose one or more image files")
        uploads = [(await f.read(), f.filename or "image") for f in files]
        # decoded on the queue's thread, off the event loop: counted and in turn like model work (64 large images
        # decoded beside it took minutes of CPU and a GB), and a large upload does not stall other requests
        images, _ = await queue.run(lambda: torch.stack([read_upload_image(d, n, size, channels) for d, n in uploads]),
                                    request=request)  # fmt: skip
        out, seconds = await queue.run(play.anomaly, images, [n for _, n in uploads], request=request)
        rows = [{**r, "heat": data_url(r["heat"])} for r in out["rows"]]
        return {"rows": rows, "scores": out["scores"], "ranked_by": out["ranked_by"], "seconds": seconds}

    app.mount("/static", StaticFiles(directory=WEB), name="static")
    app.add_middleware(Guard, max_bytes=max_upload_bytes, loopback_only=loopback_only)
    return app
