"""See it before you trust it: a local page that shows our codec beside JPEG, WebP, AVIF or JPEG XL at the
same file size, with a split line to drag across the two pictures.

  python demo.py                                  # then open http://127.0.0.1:8000
  python demo.py --port 8080 --weights weights/hyper.pt   # another of the shipped models
  python demo.py --host 0.0.0.0                   # let other machines connect (it listens on loopback by default)

Drop any photo on the page (PNG, JPEG, WebP, TIFF, …; large ones are coded in tiles, not refused); ours
runs at a quality slider, the classic codec at the setting whose file is closest in bytes (found by
bisection) or at its own slider. Each side shows bytes, bpp, PSNR, MS-SSIM and encode / decode time, and
offers its file and decoded PNG for download. Flask serves it: a small, well-kept WSGI framework, no
JavaScript build step; each request runs in its own thread, so coding never stalls the server.
"""
import argparse
import io
import os
import re
import sys
import threading
import time
import uuid
from collections import OrderedDict

from runtime import HelpFormatter, wait_passively

wait_passively()  # before torch loads OpenMP

ROOT = os.path.dirname(os.path.abspath(__file__))
PAGE = os.path.join(ROOT, "web", "demo.html")
# Those installed are offered, each labelled with its settings: AVIF tuned for PSNR and at its stock (perceptual)
# tune, what a user of a default encoder sees; JPEG XL and HEIC at settings quick enough for the page's bisection.
DEMO_CODECS = ("jpeg420", "webp", "avif", "avif-stock", "jxl-stock", "heic-fast")
SETTINGS = {"jpeg420": (1, 100), "webp": (0, 100), "avif": (0, 100), "avif-stock": (0, 100), "jxl-stock": (1, 100),
            "heic-fast": (1, 100)}
EXTENSIONS = {"jpeg420": "jpg", "webp": "webp", "avif": "avif", "avif-stock": "avif", "jxl-stock": "jxl",
              "heic-fast": "heic"}
KEEP_IMAGES = 8  # uploads kept in memory (the oldest is forgotten first)
WAIT_S = 120  # a request waits this long for the coder (one job at a time) before it is told the server is busy
MAX_EFFORT = 3  # the page's efforts: side search only, bounded time on any image size


def parse_args(argv=None):
    """Command-line flags; every default runs."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (loopback: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port")
    p.add_argument("--weights", default=None, help="our checkpoint (default: the shipped default model)")
    p.add_argument("--max-upload-mb", type=float, default=64, help="largest upload accepted, in MB")
    p.add_argument("--max-pixels", type=float, default=40e6,
                   help="largest image accepted, in pixels (checked from its header before it is decoded; "
                        f"{KEEP_IMAGES} uploads are kept)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    return p.parse_args(argv)


class Store:
    """The last few uploads and their results, by token (thread-safe)."""

    def __init__(self, keep=KEEP_IMAGES):
        self.items, self.keep, self.lock = OrderedDict(), keep, threading.Lock()

    def add(self, item):
        """Keep an item; its new token."""
        token = uuid.uuid4().hex
        with self.lock:
            self.items[token] = item
            while len(self.items) > self.keep:
                self.items.popitem(last=False)
        return token

    def get(self, token):
        """The item of a token, or None when unknown or forgotten."""
        with self.lock:
            return self.items.get(token)


def png_bytes(rgb):
    """A uint8 RGB array as PNG bytes (fast compression: the page shows it once)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def scores(original, decoded, data, t_enc, t_dec):
    """What the page shows of one side (bytes, bpp, PSNR, MS-SSIM, times); NaN MS-SSIM becomes None."""
    import metrics

    ms = metrics.ms_ssim(original, decoded)
    return {"bytes": len(data), "bpp": metrics.bpp(len(data), *original.shape[:2]), "psnr": metrics.psnr(original, decoded),
            "ms_ssim": None if ms != ms else ms, "encode_s": t_enc, "decode_s": t_dec}


def code_ours(codec, rgb, quality, effort):
    """Our codec at a quality and effort: (file bytes, decoded RGB, encode s, decode s)."""
    import numpy as np

    t = time.perf_counter()
    data = codec.compress(rgb, quality=quality, effort=effort)
    t_enc = time.perf_counter() - t
    t = time.perf_counter()
    decoded = np.asarray(codec.decompress(data).convert("RGB"))
    return data, decoded, t_enc, time.perf_counter() - t


def code_classic(name, rgb, setting):
    """A classic codec at one setting: (file bytes, decoded RGB, encode s, decode s)."""
    from PIL import Image

    from classic import CLASSIC, decode

    im = Image.fromarray(rgb)
    t = time.perf_counter()
    data = CLASSIC[name][2](im, setting)
    t_enc = time.perf_counter() - t
    t = time.perf_counter()
    decoded = decode(data)
    return data, decoded, t_enc, time.perf_counter() - t


def closest_setting(name, rgb, target_bytes):
    """The classic codec's setting whose file is closest to target_bytes (bisection: bytes grow with the
    setting), with its coding result."""
    lo, hi = SETTINGS[name]
    tried = {}

    def size(s):
        """Bytes at setting s (each setting coded once)."""
        if s not in tried:
            tried[s] = code_classic(name, rgb, s)
        return len(tried[s][0])

    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if size(mid) < target_bytes else (lo, mid)
    best = min((s for s in (lo - 1, lo) if SETTINGS[name][0] <= s), key=lambda s: abs(size(s) - target_bytes))
    return best, tried[best]


def number(value, lo, hi, whole=False):
    """A JSON number within [lo, hi] (a whole one if asked), or None: booleans, strings and lists are not numbers."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (whole and value != int(value)):
        return None
    return (int(value) if whole else float(value)) if lo <= value <= hi else None


def declared_pixels(data):
    """Pixels an image file declares in its header (0 when Pillow cannot read one: read_image then says why)."""
    from PIL import Image

    try:
        with Image.open(data) as im:
            width, height = im.size
    except Exception:
        width = height = 0
    data.seek(0)
    return width * height


def same_origin(request, allowed_hosts):
    """Whether a request may act: its Host is one this server answers to (no DNS rebinding) and a browser's
    Origin, when it sends one, is this server's own (no other web page driving it)."""
    if allowed_hosts is not None and request.host.lower() not in allowed_hosts:
        return False
    origin = request.headers.get("Origin")
    return origin is None or origin.lower() in (f"http://{request.host.lower()}", f"https://{request.host.lower()}")


def download_name(name):
    """A file name safe inside a Content-Disposition header: characters outside [A-Za-z0-9._-] become _."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)[:200] or "image"


class Demo:
    """What the page's requests do, on a loaded codec: each method returns (JSON-able dict, HTTP status)."""

    def __init__(self, codec, max_pixels=40e6):
        from classic import CLASSIC, available

        self.codec, self.store, self.busy, self.max_pixels = codec, Store(), threading.BoundedSemaphore(1), max_pixels
        self.codecs = [{"name": n, "label": CLASSIC[n][0], "range": SETTINGS[n]} for n in DEMO_CODECS if available(n)]

    def info(self):
        """Our model and the classic codecs installed here."""
        return {"ours": {"model": self.codec.kind, "qualities": [1, self.codec.model.num_qualities],
                         "efforts": [0, MAX_EFFORT]}, "classic": self.codecs}, 200

    def upload(self, file):
        """An uploaded file (werkzeug FileStorage) → its token and size; a clear error for what is not an image."""
        from imagefiles import read_image

        if file is None:
            return {"error": "no file in the upload"}, 400
        data = io.BytesIO(file.read())
        data.name = file.filename or "upload"  # what read_image's messages call it
        pixels = declared_pixels(data)
        if pixels > self.max_pixels:
            return {"error": f"the image has {pixels:,} pixels, more than the {self.max_pixels:,.0f} this server "
                             f"accepts"}, 413

        def work():
            """Decode (one job at a time, like coding: a large decode is as heavy), keep, describe."""
            rgb, _, _, notices = read_image(data)
            token = self.store.add({"rgb": rgb, "name": data.name, "files": {}})
            return {"token": token, "width": rgb.shape[1], "height": rgb.shape[0], "name": data.name,
                    "notices": notices}

        return self.job(work)

    def job(self, work):
        """Run one coding job at a time (a 2-core CPU codes faster one after another); busy after WAIT_S."""
        if not self.busy.acquire(timeout=WAIT_S):
            return {"error": "the server is busy with other images: try again"}, 503
        try:
            return work(), 200
        except ValueError as e:
            return {"error": str(e)}, 400
        finally:
            self.busy.release()

    def ours(self, body):
        """Our codec at the requested quality and effort."""
        item = self.store.get(str(body.get("token", "")))
        if item is None:
            return {"error": "unknown or expired image: upload it again"}, 404
        top = self.codec.model.num_qualities
        quality = number(body.get("quality", 4), 1, top)
        effort = number(body.get("effort", 1), 0, MAX_EFFORT, whole=True)
        if quality is None or effort is None:
            return {"error": f"quality must be a number from 1 to {top} and effort a whole number from 0 to "
                             f"{MAX_EFFORT} on this page"}, 400

        def work():
            """Code, decode, keep the files, score."""
            data, decoded, t_enc, t_dec = code_ours(self.codec, item["rgb"], quality, effort)
            item["files"].update({"ours.qae": data, "ours.png": png_bytes(decoded)})
            return {**scores(item["rgb"], decoded, data, t_enc, t_dec), "quality": quality, "effort": effort}

        return self.job(work)

    def classic(self, body):
        """A classic codec at its own setting, or at the setting whose file is closest to target_bytes."""
        item, name = self.store.get(str(body.get("token", ""))), body.get("codec")
        if item is None:
            return {"error": "unknown or expired image: upload it again"}, 404
        if name not in [c["name"] for c in self.codecs]:
            return {"error": f"codec {name!r} is not available here"}, 400

        lo, hi = SETTINGS[name]
        target = number(body["target_bytes"], 1, 1 << 40, whole=True) if "target_bytes" in body else None
        setting = number(body.get("setting", (lo + hi) // 2), lo, hi, whole=True)
        if ("target_bytes" in body and target is None) or setting is None:
            return {"error": f"setting must be a whole number from {lo} to {hi}, target_bytes a positive whole "
                             f"number"}, 400

        def work():
            """Code (matched or at the setting), decode, keep the files, score."""
            if target is not None:
                setting_used, (data, decoded, t_enc, t_dec) = closest_setting(name, item["rgb"], target)
            else:
                setting_used, (data, decoded, t_enc, t_dec) = setting, code_classic(name, item["rgb"], setting)
            item["files"].update({f"classic.{EXTENSIONS[name]}": data, "classic.png": png_bytes(decoded)})
            return {**scores(item["rgb"], decoded, data, t_enc, t_dec), "setting": setting_used,
                    "file": f"classic.{EXTENSIONS[name]}"}

        return self.job(work)

    def file(self, token, name):
        """(bytes, download name) of one side's file, or None: ours.qae, ours.png, classic.png, the classic file."""
        item = self.store.get(token)
        if item is None or name not in item["files"]:
            return None
        return item["files"][name], f"{os.path.splitext(item['name'])[0]}.{name}"


def create_app(codec, max_upload_mb=64, max_pixels=40e6, allowed_hosts=None):
    """The Flask app around a loaded qae.Codec: the page, its JSON API and the files. allowed_hosts: the Host
    headers it answers ("127.0.0.1:8000", …; None: any), also settable later as app.config["ALLOWED_HOSTS"]."""
    from flask import Flask, Response, jsonify, request

    app, demo = Flask(__name__), Demo(codec, max_pixels)
    app.config["MAX_CONTENT_LENGTH"] = int(max_upload_mb * 2**20)
    app.config["ALLOWED_HOSTS"] = allowed_hosts
    reply = lambda result: (jsonify(result[0]), result[1])  # noqa: E731

    def body():
        """The request's JSON object ({} when it has none; a list or a number is not an object)."""
        value = request.get_json(silent=True)
        return value if isinstance(value, dict) else {}

    app.add_url_rule("/api/codecs", "codecs", lambda: reply(demo.info()))
    app.add_url_rule("/api/image", "image", lambda: reply(demo.upload(request.files.get("file"))), methods=["POST"])
    app.add_url_rule("/api/ours", "ours", lambda: reply(demo.ours(body())), methods=["POST"])
    app.add_url_rule("/api/classic", "classic", lambda: reply(demo.classic(body())), methods=["POST"])

    @app.before_request
    def guard():
        """Refuse other hosts' names and other origins' pages before anything runs."""
        if not same_origin(request, app.config["ALLOWED_HOSTS"]):
            return jsonify({"error": "this server answers only its own page"}), 403

    @app.get("/")
    def page():
        """The comparison page."""
        with open(PAGE, encoding="utf-8") as f:
            return Response(f.read(), mimetype="text/html")

    @app.get("/api/file/<token>/<name>")
    def download(token, name):
        """A file of one side."""
        found = demo.file(token, name)
        if found is None:
            return jsonify({"error": "no such file (code the image first)"}), 404
        mimetype = "image/png" if name.endswith(".png") else "application/octet-stream"
        return Response(found[0], mimetype=mimetype,
                        headers={"Content-Disposition": f'inline; filename="{download_name(found[1])}"'})

    @app.errorhandler(413)
    def too_large(_):
        """Uploads over the limit get a message, not a dropped connection."""
        return jsonify({"error": f"the file is larger than the {max_upload_mb:g} MB this server accepts"}), 413

    return app


def served_hosts(host, port):
    """The Host headers a server on host:port answers: on a loopback address only loopback names (a DNS name
    rebound to 127.0.0.1 is refused); on a shared address (0.0.0.0, a LAN name) any."""
    if host not in ("127.0.0.1", "localhost", "::1"):
        return None
    return {f"{name}:{port}" for name in ("127.0.0.1", "localhost", "[::1]")}


def main(argv=None):
    """Load the codec once, then serve the page until Ctrl-C."""
    args = parse_args(argv)
    import torch
    from werkzeug.serving import make_server

    import qae

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        codec = qae.Codec(args.weights)
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    app = create_app(codec, args.max_upload_mb, args.max_pixels)
    server = make_server(args.host, args.port, app, threaded=True)
    app.config["ALLOWED_HOSTS"] = served_hosts(args.host, server.server_port)  # the port is known now (0: any free)
    print(f"comparison page on http://{args.host}:{server.server_port}/  (Ctrl-C stops it)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped")


if __name__ == "__main__":
    main()
