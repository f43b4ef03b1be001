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

from some_define import UsageError, read_image

from .export import label_image
from .tiles import DEFAULT_OVERLAP, Tile, chosen_tile, predict_any_size

# Decoded, a pixel costs about 20 bytes here (the image, its classes, the PNGs): 64 Mpixel is about 1.3 GB.
MAX_PIXELS = 64_000_000
# The page only talks to this server: no external script, style, font or image can load (it works offline).
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                           "img-src data:; connect-src 'self'")
Model = tuple[str, nn.Module, dict, Path]   # label, network, checkpoint, its path
FIELD = "file"   # the multipart field that holds the photo (curl -F file=@photo.jpg, the page's own form data)
DEMO_NOTE = ("trained on the synthetic demo data (coloured shapes, not photos), so predictions on photos mean "
             "little; train on VOC or your own data for those")


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


def trained_on(checkpoint: dict) -> str:
    """What a checkpoint's model was trained on: the synthetic demo data or the dataset folder of its run."""
    config = checkpoint.get("config", {})
    if config.get("demo"):
        return "the synthetic demo data (coloured shapes, not photos)"
    return config.get("voc_dir") or "VOC2012"   # training's default folder


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
               max_upload_mb: float = 25, max_waiting: int = 4, **flags) -> Flask:
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
    def predict() -> Response:
        with queue.place():
            data = uploaded_bytes(request)
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
.swatch { width: 1em; height: 1em; border: 1px solid #444; flex: none; }
#note { background: #fff4d6; border: 1px solid #d9a400; border-radius: 5px; padding: .4em .7em; }
#about { margin: .6em 0; } #about summary { cursor: pointer; font-weight: bold; }
#models { display: flex; flex-wrap: wrap; gap: 0 2em; } #models p { margin: .2em 0; }
.key { columns: 12em; } #about h2 { font-size: 1.1em; margin: .6em 0 .2em; }
code { background: #f2f2f2; padding: 0 .25em; }
.legend b { margin-left: auto; font-variant-numeric: tabular-nums; }
a.button { padding: .3em .8em; border: 1px solid #36c; border-radius: 5px; color: #36c; text-decoration: none; }
</style></head><body>
<h1>__TITLE__ on your photo</h1>
__NOTE__<div id="drop"><p>Drop a photo here, or choose one: <input type="file" id="file" accept="image/*"></p>
<p class="hint">Up to __MAX_MB__ MB, any size (large photos are predicted in tiles). Nothing is kept.</p></div>
<p><label>overlay opacity <input type="range" id="opacity" min="0" max="1" step="0.05" value="0.6"></label></p>
<details id="about" open><summary>the models and their classes</summary>__ABOUT__</details>
<div id="status"></div><div id="results" data-state="empty"></div>
<p class="hint">From a script: <code id="api">curl -F file=@photo.jpg http://HOST:PORT/predict</code> answers JSON
(the API: docs/serve.md).</p>
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
  $('about').open = false;   // the results take its place; a click opens it again
  if (file.size > MAX_BYTES) {
    results.dataset.state = 'error';
    return say(`${file.name} is ${(file.size / 2 ** 20).toFixed(1)} MB, over the limit of __MAX_MB__ MB`, true);
  }
  say(`predicting ${file.name} …`);
  let reply, answer;
  try {
    const form = new FormData();
    form.append('file', file);   // multipart, as a form or curl -F sends it
    reply = await fetch('predict', {method: 'POST', body: form});
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
$('api').textContent = `curl -F file=@photo.jpg ${new URL('predict', location.href)}`;
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
