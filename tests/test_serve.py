"""--serve over real HTTP on 127.0.0.1: the page and its first view (models, data, classes, the demo note), a good
image as a raw body and as a multipart upload, the tiled path, bad requests (too large, not an image, wrong method,
wrong field), the one-at-a-time queue, the command line, and a real headless Chromium that uploads a demo image and
shows the overlays. Tiny random-init networks, CPU only."""
from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
import werkzeug.formparser
from PIL import Image
from torch import nn
from werkzeug.serving import make_server

from conftest import REPO_ROOT, THREADS, synthetic_image
import some_define as sd
from support import checkpoints, demo, serve, tiles
from support.prediction import open_model

CPU = torch.device("cpu")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def random_model(name: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return sd.build_model(name, len(sd.VOC_CLASSES), "none").eval()


@pytest.fixture(scope="module")
def checkpoint_files(tmp_path_factory) -> dict[str, Path]:
    """Random-init FCN and U-Net checkpoints, saved as training saves them."""
    folder = tmp_path_factory.mktemp("checkpoints")
    files = {}
    for seed, name in enumerate(("fcn", "unet")):
        files[name] = folder / f"{name}.pt"
        checkpoint = checkpoints.make_checkpoint(random_model(name, seed), name, sd.VOC_CLASSES, sd.VOC_COLORMAP, {})
        checkpoints.save_checkpoint(files[name], checkpoint)
    return files


@pytest.fixture(scope="module")
def models(checkpoint_files) -> list[serve.Model]:
    """[FCN, U-Net] as run_prediction hands them to serve(): label, network, checkpoint, path."""
    return [(label, *open_model(checkpoint_files[name], CPU), checkpoint_files[name])
            for label, name in (("FCN", "fcn"), ("U-Net", "unet"))]


@contextmanager
def running(app):
    """The app on a free port of 127.0.0.1, in a thread; yields its URL."""
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.port}/"
    finally:
        server.shutdown()
        server.server_close()


def http(url: str, data: bytes | None = None, method: str | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=120) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def decode_data_url(url: str) -> Image.Image:
    header, payload = url.split(",", 1)
    assert header.startswith("data:image/")
    return Image.open(io.BytesIO(base64.b64decode(payload)))


def assert_error(status: int, body: bytes, expected: int, words: str) -> None:
    """A refused request: the expected status and one JSON line naming the problem, never a traceback."""
    assert status == expected, (status, body[:200])
    assert b"Traceback" not in body
    error = json.loads(body)["error"]
    assert words in error and "\n" not in error


def multipart(parts: dict[str, tuple[str | None, bytes]]) -> tuple[bytes, dict[str, str]]:
    """A multipart/form-data body and its header, byte for byte as curl -F writes them: {field: (filename or None
    for a plain field, content)}."""
    boundary = "------------------------d74496d66958873e"
    body = b""
    for field, (filename, content) in parts.items():
        file = f'; filename="{filename}"\r\nContent-Type: application/octet-stream' if filename is not None else ""
        body += f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"{file}\r\n\r\n'.encode()
        body += content + b"\r\n"
    return body + f"--{boundary}--\r\n".encode(), {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def jpeg_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def without_times(body: bytes) -> dict:
    answer = json.loads(body)
    for result in answer["models"]:
        result.pop("seconds")
    return answer


PHOTO = synthetic_image(70, 90, 1)


def demo_models(models: list[serve.Model]) -> list[serve.Model]:
    """The same networks, as if trained on the demo data (the checkpoint config says so)."""
    return [(label, net, dict(checkpoint, config={"demo": True}, epoch=12), path)
            for label, net, checkpoint, path in models]


def test_page_is_self_contained(models):
    with running(serve.create_app(models, CPU)) as url:
        with urllib.request.urlopen(url, timeout=30) as reply:
            page = reply.read().decode()
            policy = reply.headers["Content-Security-Policy"]
    assert 'type="file"' in page and 'id="opacity"' in page and "FCN vs U-Net" in page
    assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", page), "no external assets"
    assert "@import" not in page and "url(" not in page
    assert "default-src 'none'" in policy


def test_first_view_names_the_models_their_data_and_classes(models):
    """Before any upload: each model's file, what it was trained on, and every class with its colour."""
    with running(serve.create_app(models, CPU)) as url:
        page = http(url)[1].decode()
    for label, _, _, path in models:
        assert f"<h2>{label}</h2><div class=\"path\">{path}</div><p>trained on VOC2012; 21 classes</p>" in page
    for index, (name, (r, g, b)) in enumerate(zip(sd.VOC_CLASSES, sd.VOC_COLORMAP)):
        assert f'<span class="swatch" style="background: rgb({r},{g},{b})"></span>{index} {name}</li>' in page
    assert page.count('class="swatch" style=') == 21, "one key, as both models have VOC's classes"
    assert 'id="note"' not in page and "demo data" not in page


def test_first_view_of_demo_models_carries_the_demo_note(models):
    with running(serve.create_app(demo_models(models), CPU)) as url:
        page = http(url)[1].decode()
    assert ('<p id="note">note: FCN and U-Net were trained on the synthetic demo data (coloured shapes, not photos), '
            'so predictions on photos mean little; train on VOC or your own data for those.</p>') in page
    assert "epoch 12</div><p>trained on the synthetic demo data (coloured shapes, not photos); 21 classes" in page


def test_a_multipart_upload_answers_as_the_raw_body_does(models):
    """curl -F file=@street.jpg (and a browser form) send multipart/form-data: the same answer as the raw JPEG."""
    jpeg = jpeg_bytes(PHOTO)
    body, headers = multipart({"note": (None, b"a plain field first"), "file": ("street.jpg", jpeg)})
    with running(serve.create_app(models, CPU)) as url:
        status, answer = http(url + "predict", body, headers=headers)
        raw_status, raw_answer = http(url + "predict", jpeg, headers={"Content-Type": "image/jpeg"})
    assert (status, raw_status) == (200, 200), answer[:300]
    assert without_times(answer) == without_times(raw_answer)
    assert (json.loads(answer)["width"], json.loads(answer)["height"]) == (90, 70)


def test_bad_multipart_uploads_get_one_line(models):
    wrong_field, headers = multipart({"image": ("street.jpg", jpeg_bytes(PHOTO)), "x": (None, b"1")})
    no_file, _ = multipart({"file": ("", b"")})   # a browser form sent with no file chosen
    with running(serve.create_app(models, CPU, max_upload_mb=1)) as url:
        status, body = http(url + "predict", wrong_field, headers=headers)
        assert_error(status, body, 400, "")
        assert json.loads(body)["error"] == ("a multipart upload carries the photo in the field 'file' (fields sent: "
                                             "'image', 'x'), e.g. curl -F file=@photo.jpg")
        assert_error(*http(url + "predict", no_file, headers=headers), 400, "no image in the request")
        assert_error(*http(url + "predict", multipart({"file": ("a.jpg", b"not an image")})[0], headers=headers),
                     415, "not an image")
        too_large, _ = multipart({"file": ("big.jpg", os.urandom(1_500_000))})
        assert_error(*http(url + "predict", too_large, headers=headers), 413, "over the limit of 1 MB")


def test_a_multipart_upload_never_becomes_a_file(models, monkeypatch):
    """werkzeug spills parts over 500 kB to a temporary file; the server keeps them in memory instead."""
    def no_file(*args, **kwargs):
        raise AssertionError("an upload was written to a temporary file")
    monkeypatch.setattr(werkzeug.formparser, "SpooledTemporaryFile", no_file)   # what werkzeug would call
    body, headers = multipart({"file": ("big.bin", os.urandom(800_000))})
    with running(serve.create_app(models, CPU)) as url:
        assert_error(*http(url + "predict", body, headers=headers), 415, "not an image")   # read, not a 500


def test_good_image(models):
    with running(serve.create_app(models, CPU)) as url:
        status, body = http(url + "predict", png_bytes(PHOTO))
    assert status == 200, body[:300]
    answer = json.loads(body)
    assert (answer["width"], answer["height"], answer["tile"]) == (90, 70, None)
    assert decode_data_url(answer["image"]).size == (90, 70)
    assert [m["label"] for m in answer["models"]] == ["FCN", "U-Net"]
    image = torch.from_numpy(PHOTO).permute(2, 0, 1).contiguous()
    for result, (_, net, _, path) in zip(answer["models"], models):
        assert result["checkpoint"] == str(path) and result["seconds"] > 0
        assert sum(c["share"] for c in result["classes"]) == pytest.approx(1, abs=1e-9)
        assert all(sd.VOC_CLASSES[c["index"]] == c["name"] and c["color"] == sd.VOC_COLORMAP[c["index"]]
                   for c in result["classes"])
        png = decode_data_url(result["png"])
        assert png.mode == "P" and png.size == (90, 70)
        assert np.array_equal(np.array(png), sd.predict(image, net, CPU).numpy())   # the class indices
        alpha = np.array(decode_data_url(result["layer"]).convert("RGBA"))[..., 3]
        assert np.array_equal(alpha == 0, np.array(png) == 0), "background, and only it, is see-through"


def test_large_image_goes_through_tiles(models):
    with running(serve.create_app(models[1:], CPU, tile=(32, 64), overlap=0.5)) as url:
        status, body = http(url + "predict", png_bytes(PHOTO))
    answer = json.loads(body)
    assert status == 200 and answer["tile"] == [32, 64]
    image = torch.from_numpy(PHOTO).permute(2, 0, 1).contiguous()
    expected = tiles.predict_tiled(image, models[1][1], CPU, (32, 64), 0.5)
    assert np.array_equal(np.array(decode_data_url(answer["models"][0]["png"])), expected.numpy())


def test_bad_requests_get_one_line_and_the_server_goes_on(models, monkeypatch):
    jpeg = io.BytesIO()
    Image.fromarray(PHOTO).save(jpeg, format="JPEG")
    truncated = jpeg.getvalue()[:len(jpeg.getvalue()) // 2]
    with running(serve.create_app(models, CPU, max_upload_mb=1)) as url:
        assert_error(*http(url + "predict", os.urandom(1_500_000)), 413, "over the limit of 1 MB")
        assert_error(*http(url + "predict", b"not an image at all"), 415, "not an image")
        assert_error(*http(url + "predict", truncated), 415, "damaged or truncated")
        assert_error(*http(url + "predict", b""), 400, "no image")
        assert_error(*http(url + "predict"), 405, "GET is not allowed")
        assert_error(*http(url, b"x", method="PUT"), 405, "PUT is not allowed")
        assert_error(*http(url + "upload"), 404, "POST /predict")
        monkeypatch.setattr(serve, "MAX_PIXELS", 1000)
        assert_error(*http(url + "predict", png_bytes(PHOTO)), 413, "90 x 70 = ")
        monkeypatch.undo()
        assert http(url)[0] == 200
        assert http(url + "predict", png_bytes(PHOTO))[0] == 200


class FailsOnce(nn.Module):
    """A network whose first call fails, as running out of memory would."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net, self.calls = net, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("out of memory (simulated)\nmore detail")
        return self.net(x)


def test_a_failing_model_call_is_a_500_line_and_the_server_goes_on(models):
    label, net, checkpoint, path = models[1]
    with running(serve.create_app([(label, FailsOnce(net), checkpoint, path)], CPU)) as url:
        assert_error(*http(url + "predict", png_bytes(PHOTO)), 500, "(RuntimeError: out of memory (simulated))")
        assert http(url + "predict", png_bytes(PHOTO))[0] == 200


class Probe(nn.Module):
    """A network that takes its time and counts how many of its kind run at once."""

    def __init__(self, net: nn.Module, seen: dict, delay: float):
        super().__init__()
        self.net, self.seen, self.delay = net, seen, delay

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self.seen["lock"]:
            self.seen["now"] += 1
            self.seen["most"] = max(self.seen["most"], self.seen["now"])
        time.sleep(self.delay)
        try:
            return self.net(x)
        finally:
            with self.seen["lock"]:
                self.seen["now"] -= 1


def probed(models, delay: float) -> tuple[list, dict]:
    seen = {"lock": threading.Lock(), "now": 0, "most": 0}
    return [(label, Probe(net, seen, delay), checkpoint, path) for label, net, checkpoint, path in models], seen


def post_together(url: str, count: int) -> list[tuple[int, bytes]]:
    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(lambda _: http(url + "predict", png_bytes(PHOTO)), range(count)))


def test_concurrent_requests_are_served_one_at_a_time(models):
    slow, seen = probed(models, delay=0.1)
    with running(serve.create_app(slow, CPU, max_waiting=8)) as url:
        replies = post_together(url, 5)
    assert [status for status, _ in replies] == [200] * 5
    assert seen["most"] == 1, "never two model calls at once"


def test_a_full_queue_answers_busy(models):
    slow, seen = probed(models, delay=0.5)
    with running(serve.create_app(slow, CPU, max_waiting=1)) as url:
        replies = post_together(url, 6)
        statuses = sorted(status for status, _ in replies)
        assert statuses.count(200) >= 2 and set(statuses) <= {200, 503} and 503 in statuses, statuses
        for status, body in replies:
            if status == 503:
                assert_error(status, body, 503, "busy")
        assert http(url + "predict", png_bytes(PHOTO))[0] == 200   # the queue empties again
    assert seen["most"] == 1


def test_a_taken_port_is_one_line(models):
    with running(serve.create_app(models, CPU)) as url:
        port = int(url.rsplit(":", 1)[1].strip("/"))
        with pytest.raises(sd.UsageError, match=f"--port {port}: cannot listen there"):
            serve.serve(models, CPU, "127.0.0.1", port)


def test_command_line_serves_both_models(checkpoint_files):
    """python my_predict.py --serve: the start-up line with the URL, the 25 MB default limit, a prediction."""
    env = dict(os.environ, OMP_NUM_THREADS=THREADS, PYTHONUNBUFFERED="1")
    process = subprocess.Popen([sys.executable, "my_predict.py", "--serve", "--port", "0", "--device", "cpu",
                                "--checkpoint", str(checkpoint_files["unet"]),
                                "--compare", str(checkpoint_files["fcn"])],
                               cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        while not lines or not lines[-1].startswith("serving"):
            line = process.stdout.readline()
            assert line, f"the server stopped: {lines} {process.stderr.read()}"
            lines.append(line)
        url = re.search(r"http://127\.0\.0\.1:\d+/", lines[-1]).group(0)
        assert "FCN" in lines[-1] and "U-Net" in lines[-1]
        assert_error(*http(url + "predict", bytes(26 * 2**20)), 413, "over the limit of 25 MB")
        status, body = http(url + "predict", png_bytes(PHOTO))
        assert status == 200 and [m["label"] for m in json.loads(body)["models"]] == ["FCN", "U-Net"]
    finally:
        process.terminate()
        process.communicate(timeout=30)


def browser_screenshot(url: str, image: Path, out: Path, opacity: float | None = None,
                       window: tuple[int, int] = (1280, 900)) -> dict:
    """Open the page in headless Chromium, upload ``image``, wait for the overlays, set the opacity slider, save a
    screenshot to ``out``; return the page's state, its status line and the overlay layers' rectangles."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM   # with the driver's path below, Selenium downloads nothing
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--force-device-scale-factor=1", f"--user-data-dir={profile}",
                 f"--window-size={window[0]},{window[1]}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.get(url)
        first_view = driver.find_element(By.TAG_NAME, "body").text
        driver.find_element(By.ID, "file").send_keys(str(Path(image).resolve()))
        results = driver.find_element(By.ID, "results")
        WebDriverWait(driver, 120).until(lambda _: results.get_attribute("data-state") in ("done", "error"))
        if opacity is not None:
            driver.execute_script("const s = document.getElementById('opacity'); s.value = arguments[0]; "
                                  "s.dispatchEvent(new Event('input'));", opacity)
        driver.save_screenshot(str(out))
        return {"state": results.get_attribute("data-state"), "status": driver.find_element(By.ID, "status").text,
                "layers": [layer.rect for layer in driver.find_elements(By.CSS_SELECTOR, ".layer")],
                "first_view": first_view, "about_open": driver.execute_script("return $('about').open")}
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="no chromium and chromedriver found (Debian: apt-get "
                    "install chromium chromium-driver; .ci/run installs them)")
def test_browser_shows_the_overlays(models, tmp_path):
    """A real headless Chromium shows the models, the demo note and the classes, then uploads a demo val image (as
    the page's multipart form data); the overlays appear with the class colours."""
    pytest.importorskip("selenium", reason="selenium is not installed (.ci/run installs it)")
    image = sorted((demo.make_demo_voc() / "JPEGImages").glob("demo_val_*.jpg"))[0]
    shot = tmp_path / "serve.png"
    with running(serve.create_app(demo_models(models), CPU)) as url:
        page = browser_screenshot(url, image, shot, opacity=1.0)
    first_view = page["first_view"].splitlines()
    assert first_view[1].startswith("note: FCN and U-Net were trained on the synthetic demo data"), first_view
    for label, _, _, path in models:
        assert first_view[first_view.index(label) + 1:][:2] == [
            f"{path}, epoch 12", "trained on the synthetic demo data (coloured shapes, not photos); 21 classes"]
    assert all(f"{index} {name}" in first_view for index, name in enumerate(sd.VOC_CLASSES))
    assert page["about_open"] is False, "the results take the first view's place"
    assert page["state"] == "done", page["status"]
    assert "pixels, predicted as a whole" in page["status"]
    assert len(page["layers"]) == 2
    screenshot = np.array(Image.open(shot).convert("RGB"))
    for rect, (label, net, _, _) in zip(page["layers"], models):
        pred = sd.predict(sd.read_image(image, upright=True), net, CPU)
        shown = set(pred.unique().tolist()) - {0}   # background is see-through
        x, y, w, h = (round(rect[k]) for k in ("x", "y", "width", "height"))
        assert w > 300 and y + h <= screenshot.shape[0], "the overlay is large and on the screenshot"
        region = screenshot[y + 2:y + h - 2, x + 2:x + w - 2].reshape(-1, 3)
        in_colours = np.isin(region @ [65536, 256, 1], [np.dot(sd.VOC_COLORMAP[c], [65536, 256, 1]) for c in shown])
        # At full opacity, the overlay shows the predicted classes' own colours, on about their share of the image.
        assert in_colours.mean() == pytest.approx((pred != 0).float().mean().item(), abs=0.05), label
