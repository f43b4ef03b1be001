"""--serve: a local web page where you drop a photo and see the models' predictions side by side (Flask), and its
API (docs/serve.md). Uploads are decoded in memory and dropped with the response; one model call runs at a time, a
few requests may wait for it."""
from __future__ import annotations

import base64
import html
import io
import socket
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import torch
from flask import Flask, Request, Response, jsonify, request
from PIL import Image
from torch import nn
from werkzeug.exceptions import HTTPException
from werkzeug.serving import make_server, select_address_family

from some_define import Speed, UsageError, read_image

from .demo import DEMO_NOTE
from .export import palette_image
from .tiles import DEFAULT_OVERLAP, Tile, chosen_tile, predict_any_size

# Decoded, a pixel costs about 20 bytes here (the image, its classes, the PNGs): 64 Mpixel is about 1.3 GB.
MAX_PIXELS = 64_000_000
# The page only talks to this server: no external script, style, font or image can load (it works offline).
# The page itself, with __PLACEHOLDERS__ that create_app fills in: one self-contained file, no outside assets.
PAGE = (Path(__file__).parent / "page.html").read_text(encoding="utf-8")
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                           "img-src data:; connect-src 'self'")
Model = tuple[str, nn.Module, dict, Path]   # label, network, checkpoint, its path
FIELD = "file"   # the multipart field that holds the photo (curl -F file=@photo.jpg, the page's own form data)


class RequestError(Exception):
    """A request the server refuses: the HTTP status and the one line the page shows."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class ModelQueue:
    """One model call at a time (a large photo needs all the memory), and at most ``max_waiting`` requests waiting
    for it; more are refused with 503 rather than piling up."""

    def __init__(self, max_waiting: int):
        self.model = threading.Lock()
        self.places = threading.BoundedSemaphore(max_waiting + 1)

    @contextmanager
    def place(self) -> Iterator[None]:
        if not self.places.acquire(blocking=False):
            raise RequestError(503, "busy: other photos are waiting for the models; try again in a moment")
        try:
            yield
        finally:
            self.places.release()


class InMemoryRequest(Request):
    """Multipart parts stay in memory (werkzeug spills those over 500 kB to a temporary file), so nothing sent
    becomes a file; MAX_CONTENT_LENGTH bounds them."""

    def _get_file_stream(self, total_content_length, content_type, filename=None, content_length=None):
        return io.BytesIO()


def uploaded_bytes(req: Request) -> bytes:
    """The photo of a POST /predict: the multipart field ``file`` (a browser form, curl -F) or else the raw body."""
    if req.mimetype != "multipart/form-data":
        return req.get_data(cache=False)   # over MAX_CONTENT_LENGTH: a 413
    if FIELD not in req.files:
        sent = ", ".join(f"'{name}'" for name in [*req.files, *req.form]) or "none"
        raise RequestError(400, f"a multipart upload carries the photo in the field '{FIELD}' (fields sent: {sent}), "
                                f"e.g. curl -F {FIELD}=@photo.jpg")
    return req.files[FIELD].read()


def decode_image(data: bytes) -> torch.Tensor:
    """The uploaded bytes as an upright uint8 image (3 x H x W), decoded in memory: nothing sent becomes a file."""
    if not data:
        raise RequestError(400, f"no image in the request: send the photo as the body of POST /predict or as its "
                                f"multipart field '{FIELD}'")
    limit = f"the limit is {MAX_PIXELS / 1e6:.0f} Mpixel"
    # Whatever the decoders raise on untrusted bytes, the answer is the same; the header comes first (a size check
    # before decoding the pixels).
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
    except Image.DecompressionBombError:
        raise RequestError(413, f"the image has far too many pixels; {limit}")
    except Exception:
        raise RequestError(415, "not an image this server can read (JPEG, PNG, WebP, BMP, GIF or TIFF)")
    if width * height > MAX_PIXELS:
        raise RequestError(413, f"the image has {width} x {height} = {width * height / 1e6:.0f} Mpixel; {limit}")
    try:
        return read_image(io.BytesIO(data), upright=True)
    except Exception:
        raise RequestError(415, "the image is damaged or truncated: it cannot be decoded")


def data_url(im: Image.Image, fmt: str, **options) -> str:
    buffer = io.BytesIO()
    im.save(buffer, format=fmt, **options)
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buffer.getvalue()).decode()}"


def class_shares(pred: torch.Tensor, class_names: Sequence[str], colormap: Sequence[Sequence[int]]) -> list[dict]:
    """The classes present, most pixels first, with their share of the image (the shares sum to 1)."""
    counts = torch.bincount(pred.flatten(), minlength=len(class_names)).tolist()
    present = sorted((c for c, n in enumerate(counts) if n), key=lambda c: -counts[c])
    return [{"index": c, "name": class_names[c], "color": list(colormap[c]), "share": counts[c] / pred.numel()}
            for c in present]


def model_result(label: str, path: Path, checkpoint: dict, pred: torch.Tensor, seconds: float) -> dict:
    """One model's answer: its classes, its palette PNG (the --images NAME.png, to download) and the same with
    the background transparent, to lay over the photo."""
    class_names, colormap = checkpoint["class_names"], checkpoint["colormap"]
    labels = palette_image(pred, colormap)
    alpha = bytes([0 if class_names[0] == "background" else 255] + [255] * 255)
    return {"label": label, "checkpoint": str(path), "seconds": round(seconds, 3),
            "classes": class_shares(pred, class_names, colormap),
            "png": data_url(labels, "PNG"), "layer": data_url(labels, "PNG", transparency=alpha)}


def predict_request(image: torch.Tensor, models: Sequence[Model], device: torch.device, tile: Tile, overlap: float,
                    speed: Speed = Speed(), tta: bool = False) -> dict:
    """Every model's prediction of one image, each timed, through the tiled path (any size fits)."""
    results = []
    for label, net, checkpoint, path in models:
        start = time.perf_counter()
        pred = predict_any_size(image, net, device, tile, overlap, speed, tta)
        results.append(model_result(label, path, checkpoint, pred, time.perf_counter() - start))
    height, width = image.shape[1:]
    return {"width": width, "height": height, "tile": chosen_tile((height, width), tile), "models": results,
            "image": data_url(Image.fromarray(image.permute(1, 2, 0).numpy()), "JPEG", quality=90)}


def trained_on(checkpoint: dict) -> str:
    """What a checkpoint's model was trained on: the synthetic demo data or the dataset folder of its run."""
    config = checkpoint.get("config", {})
    if config.get("demo"):
        return "the synthetic demo data (coloured shapes, not photos)"
    return config.get("data_dir") or "VOC2012"   # training's default folder


def class_key_html(checkpoint: dict) -> str:
    """Every class of a checkpoint, index, colour and name, as the page's legend."""
    return '<ul class="legend key">' + "".join(
        f'<li><span class="swatch" style="background: rgb({r},{g},{b})"></span>{index} {html.escape(name)}</li>'
        for index, (name, (r, g, b)) in enumerate(zip(checkpoint["class_names"], checkpoint["colormap"]))) + "</ul>"


def about_html(models: Sequence[Model]) -> str:
    """The page's first view: each model, its file and epoch, what it was trained on, and its classes (once where
    all models share them)."""
    shared = all(c["class_names"] == models[0][2]["class_names"] and c["colormap"] == models[0][2]["colormap"]
                 for _, _, c, _ in models)
    parts = []
    for label, _, checkpoint, path in models:
        epoch = f", epoch {checkpoint['epoch']}" if "epoch" in checkpoint else ""
        classes = f"{checkpoint['num_classes']} classes" + ("" if shared else f": {class_key_html(checkpoint)}")
        parts.append(f'<div class="about-model"><h2>{html.escape(label)}</h2><div class="path">'
                     f'{html.escape(str(path))}{epoch}</div><p>trained on {html.escape(trained_on(checkpoint))}; '
                     f'{classes}</p></div>')
    key = f'<h2>classes</h2>{class_key_html(models[0][2])}' if shared else ""
    return f'<div id="models">{"".join(parts)}</div>{key}'


def demo_note_html(models: Sequence[Model]) -> str:
    """The note the command line prints for a model of the demo data, on the page; empty for other models."""
    demo = [label for label, _, checkpoint, _ in models if checkpoint.get("config", {}).get("demo")]
    if not demo:
        return ""
    were = "was" if len(demo) == 1 else "were"
    return f'<p id="note">note: {html.escape(" and ".join(demo))} {were} {DEMO_NOTE}.</p>'


def create_app(models: Sequence[Model], device: torch.device, tile: Tile = "auto", overlap: float = DEFAULT_OVERLAP,
               max_upload_mb: float = 25, max_waiting: int = 4, speed: Speed = Speed(), tta: bool = False) -> Flask:
    """The web app: GET / is the page, POST /predict takes the photo (raw body or multipart field 'file') and
    answers JSON; every error is JSON with an 'error' line and a 4xx/5xx status, never a traceback."""
    app = Flask(__name__)
    app.request_class = InMemoryRequest
    app.config["MAX_CONTENT_LENGTH"] = int(max_upload_mb * 2**20)
    queue = ModelQueue(max_waiting)
    page = (PAGE.replace("__MAX_BYTES__", str(app.config["MAX_CONTENT_LENGTH"]))
            .replace("__MAX_MB__", f"{max_upload_mb:g}")
            .replace("__TITLE__", html.escape(" vs ".join(label for label, *_ in models)))
            .replace("__NOTE__", demo_note_html(models)).replace("__ABOUT__", about_html(models)))

    @app.get("/")
    def index() -> Response:
        return Response(page, mimetype="text/html", headers={"Content-Security-Policy": CONTENT_SECURITY_POLICY})

    @app.post("/predict")
    def post_predict() -> Response:
        with queue.place():
            data = uploaded_bytes(request)
            with queue.model:
                return jsonify(predict_request(decode_image(data), models, device, tile, overlap, speed, tta))

    @app.errorhandler(RequestError)
    def refused(e: RequestError):
        return jsonify(error=str(e)), e.status

    @app.errorhandler(HTTPException)
    def http_error(e: HTTPException):
        if e.code == 413:
            return jsonify(error=f"the upload is over the limit of {max_upload_mb:g} MB (--max-upload-mb)"), 413
        what = f"{request.method} is not allowed here" if e.code == 405 else f"{e.code} {e.name}"
        return jsonify(error=f"{what}: GET / is the page, POST /predict takes a photo"), e.code

    @app.errorhandler(Exception)
    def failed(e: Exception):
        what = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        print(f"error: a prediction failed ({what}); the server goes on", file=sys.stderr)
        return jsonify(error=f"the server failed on this photo ({what})"), 500

    return app


def serve(models: Sequence[Model], device: torch.device, host: str, port: int, **options) -> None:
    """Serve the page until Ctrl-C; the start-up line says where (port 0: a free one)."""
    app = create_app(models, device, **options)
    family = select_address_family(host, port)
    try:   # bound here so that a taken port is one line and exit code 2
        listener = socket.create_server((host, port), family=family)
    except OSError as e:
        raise UsageError(f"--host {host} --port {port}: cannot listen there ({e.strerror}); choose another --port")
    server = make_server(host, port, app, threaded=True, fd=listener.fileno())
    listener.close()   # the server holds its own copy of the socket
    shown = f"[{host}]" if ":" in host else host
    names = " and ".join(f"{label} ({path})" for label, _, _, path in models)
    print(f"serving {names} on http://{shown}:{server.port}/ (open it in a browser; Ctrl-C stops)", flush=True)
    server.serve_forever()   # returns on Ctrl-C, the socket closed
    print("stopped")
