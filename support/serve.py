"""--serve: a local web page where you drop a photo and see the models' predictions side by side (Flask). Uploads are
decoded in memory and dropped with the response; one model call runs at a time, a few requests may wait for it."""
from __future__ import annotations

import base64
import io
import socket
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import torch
from flask import Flask, Response, jsonify, request
from PIL import Image
from torch import nn
from werkzeug.exceptions import HTTPException
from werkzeug.serving import make_server, select_address_family

from some_define import UsageError, read_image

from .export import label_image
from .tiles import DEFAULT_OVERLAP, Tile, chosen_tile, predict_any_size

# Decoded, a pixel costs about 20 bytes here (the image, its classes, the PNGs): 64 Mpixel is about 1.3 GB.
MAX_PIXELS = 64_000_000
# The page only talks to this server: no external script, style, font or image can load (it works offline).
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                           "img-src data:; connect-src 'self'")
Model = tuple[str, nn.Module, dict, Path]   # label, network, checkpoint, its path


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


def decode_image(data: bytes) -> torch.Tensor:
    """The uploaded bytes as an upright uint8 image (3 x H x W), decoded in memory: nothing sent becomes a file."""
    if not data:
        raise RequestError(400, "no image in the request: send the photo's bytes as the body of POST /predict")
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
    labels = label_image(pred, colormap)
    alpha = bytes([0 if class_names[0] == "background" else 255] + [255] * 255)
    return {"label": label, "checkpoint": str(path), "seconds": round(seconds, 3),
            "classes": class_shares(pred, class_names, colormap),
            "png": data_url(labels, "PNG"), "layer": data_url(labels, "PNG", transparency=alpha)}


def predict_all(image: torch.Tensor, models: Sequence[Model], device: torch.device, tile: Tile, overlap: float,
                **flags) -> dict:
    """Every model's prediction of one image, each timed, through the tiled path (any size fits)."""
    results = []
    for label, net, checkpoint, path in models:
        start = time.perf_counter()
        pred = predict_any_size(image, net, device, tile, overlap, **flags)
        results.append(model_result(label, path, checkpoint, pred, time.perf_counter() - start))
    height, width = image.shape[1:]
    return {"width": width, "height": height, "tile": chosen_tile((height, width), tile), "models": results,
            "image": data_url(Image.fromarray(image.permute(1, 2, 0).numpy()), "JPEG", quality=90)}


def create_app(models: Sequence[Model], device: torch.device, tile: Tile = "auto", overlap: float = DEFAULT_OVERLAP,
               max_upload_mb: float = 25, max_waiting: int = 4, **flags) -> Flask:
    """The web app: GET / is the page, POST /predict takes the photo's bytes and answers JSON; every error is JSON
    with an 'error' line and a 4xx/5xx status, never a traceback."""
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = int(max_upload_mb * 2**20)
    queue = ModelQueue(max_waiting)
    page = (PAGE.replace("__MAX_BYTES__", str(app.config["MAX_CONTENT_LENGTH"]))
            .replace("__MAX_MB__", f"{max_upload_mb:g}")
            .replace("__TITLE__", " vs ".join(label for label, *_ in models)))

    @app.get("/")
    def index() -> Response:
        return Response(page, mimetype="text/html", headers={"Content-Security-Policy": CONTENT_SECURITY_POLICY})

    @app.post("/predict")
    def predict() -> Response:
        with queue.place():
            data = request.get_data(cache=False)   # over MAX_CONTENT_LENGTH: a 413
            with queue.model:
                return jsonify(predict_all(decode_image(data), models, device, tile, overlap, **flags))

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


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>__TITLE__ on your photo</title>
<style>
body { font: 15px/1.4 system-ui, sans-serif; margin: 1em 1.5em; color: #222; }
h1 { font-size: 1.3em; margin: 0 0 .6em; } .model h2 { font-size: 1.1em; margin: .2em 0; }
#drop { border: 2px dashed #999; border-radius: 8px; padding: .8em; text-align: center; } #drop p { margin: .3em; }
#drop.over { background: #e8eefc; border-color: #36c; } .hint, .path { color: #666; font-size: .9em; }
#status { min-height: 1.4em; margin: .6em 0; } #status.error { color: #b00; font-weight: bold; }
#results { display: flex; flex-wrap: wrap; gap: 1.5em; } .model { flex: 1 1 340px; max-width: 760px; }
.stack { position: relative; } .stack img { display: block; width: 100%; }
.stack .layer { position: absolute; left: 0; top: 0; height: 100%; image-rendering: pixelated; }
.legend { list-style: none; padding: 0; margin: .5em 0; } .legend li { display: flex; align-items: center; gap: .5em; }
.swatch { width: 1em; height: 1em; border: 1px solid #444; }
.legend b { margin-left: auto; font-variant-numeric: tabular-nums; }
a.button { padding: .3em .8em; border: 1px solid #36c; border-radius: 5px; color: #36c; text-decoration: none; }
</style></head><body>
<h1>__TITLE__ on your photo</h1>
<div id="drop"><p>Drop a photo here, or choose one: <input type="file" id="file" accept="image/*"></p>
<p class="hint">Up to __MAX_MB__ MB, any size (large photos are predicted in tiles). Nothing is kept.</p></div>
<p><label>overlay opacity <input type="range" id="opacity" min="0" max="1" step="0.05" value="0.6"></label></p>
<div id="status"></div><div id="results" data-state="empty"></div>
<script>
const MAX_BYTES = __MAX_BYTES__, $ = id => document.getElementById(id);
const element = (tag, props = {}, ...children) => {
  const node = Object.assign(document.createElement(tag), props);
  node.append(...children);
  return node;
};
function say(text, error = false) { $('status').textContent = text; $('status').className = error ? 'error' : ''; }
function fade() { for (const img of document.querySelectorAll('.layer')) img.style.opacity = $('opacity').value; }
async function send(file) {
  if (!file) return;
  const results = $('results');
  results.replaceChildren();
  results.dataset.state = 'busy';
  if (file.size > MAX_BYTES) {
    results.dataset.state = 'error';
    return say(`${file.name} is ${(file.size / 2 ** 20).toFixed(1)} MB, over the limit of __MAX_MB__ MB`, true);
  }
  say(`predicting ${file.name} …`);
  let reply, answer;
  try {
    reply = await fetch('predict', {method: 'POST', body: file});
    answer = await reply.json();
  } catch (e) {
    results.dataset.state = 'error';
    return say(`no answer from the server (${e.message})`, true);
  }
  if (!reply.ok) { results.dataset.state = 'error'; return say(answer.error || `error ${reply.status}`, true); }
  show(answer, file.name);
}
function show(answer, name) {
  const stem = name.replace(/\\.[^.]*$/, '') || 'photo';
  const how = answer.tile ? `in ${answer.tile[0]} × ${answer.tile[1]} tiles` : 'as a whole';
  say(`${name}: ${answer.width} × ${answer.height} pixels, predicted ${how}`);
  const loads = [];
  for (const m of answer.models) {
    const photo = element('img', {src: answer.image, alt: name});
    const layer = element('img', {src: m.layer, className: 'layer', alt: `${m.label} classes`});
    loads.push(...[photo, layer].map(img => img.decode()));
    const legend = element('ul', {className: 'legend'}, ...m.classes.map(c => element('li', {},
      element('span', {className: 'swatch', style: `background: rgb(${c.color.join(',')})`}),
      c.name, element('b', {}, `${(100 * c.share).toFixed(1)} %`))));
    const download = element('a', {className: 'button', href: m.png,
      download: `${stem}_${m.label.toLowerCase().replace(/[^a-z0-9]+/g, '')}.png`}, 'download the palette PNG');
    $('results').append(element('div', {className: 'model'},
      element('h2', {}, `${m.label}: ${m.seconds.toFixed(2)} s`), element('div', {className: 'path'}, m.checkpoint),
      element('div', {className: 'stack'}, photo, layer), legend, download));
  }
  fade();
  Promise.all(loads).then(() => { $('results').dataset.state = 'done'; }, () => {
    $('results').dataset.state = 'error';
    say('the browser could not show the result', true);
  });
}
$('file').addEventListener('change', e => send(e.target.files[0]));
$('opacity').addEventListener('input', fade);
const drop = $('drop');
drop.addEventListener('dragover', e => { e.preventDefault(); drop.classList.add('over'); });
drop.addEventListener('dragleave', () => drop.classList.remove('over'));
drop.addEventListener('drop', e => {
  e.preventDefault();
  drop.classList.remove('over');
  send(e.dataTransfer.files[0]);
});
</script></body></html>
"""
