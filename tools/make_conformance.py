"""Write the conformance corpus: small source images, .qae files of every shipped model, and a manifest.

  python tools/make_conformance.py            # writes tests/conformance/
  python tools/make_conformance.py --missing  # adds a newly shipped model's files, keeps the recorded ones

The manifest holds, per file, the SHA-256 of the file, of its decoded image and of its decoded
latents; decoded/ holds each file's decoded image as PNG. tests/test_conformance.py checks that the
current code decodes every file to the same latents (exact on every machine) and to pixels within one
level of the stored image (the synthesis is float arithmetic: one level apart between 1 and 2 threads
on the same CPU), and re-encodes every current-version file to the same bytes. Regenerate only when a
change of the format or of the shipped weights is intended.
"""
import argparse
import hashlib
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import codec  # noqa: E402
from checkpoint import load_checkpoint  # noqa: E402
from imagefiles import read_image  # noqa: E402
from models.context import MEAN_BITS  # noqa: E402
from runtime import HelpFormatter  # noqa: E402

# (name, source crop of images/kodim23.png: top, left, height, width; mode)
SOURCES = [("rgb_64x48", 200, 300, 48, 64, "RGB"), ("odd_37x53", 100, 500, 53, 37, "RGB"),
           ("gray_40x40", 250, 120, 40, 40, "L"), ("rgba_48x32", 60, 60, 32, 48, "RGBA"), ("dot_1x1", 10, 10, 1, 1, "RGB"),
           ("rgb_256x192", 150, 250, 192, 256, "RGB"), ("wide_1100x32", 300, 0, 32, 1100, "RGB")]
# (weights, source, quality, coder, version): versions before the current one are re-coded in their own
# layout, and the current version's files cover the same cases plus a file of several tiles
LEGACY = [("seed_resnet101.pt", "rgb_64x48", None, "constriction"),
          ("seed_resnet101.pt", "gray_40x40", None, "arithmetic-compressor"),
          ("rd.pt", "rgb_64x48", 1, "constriction"), ("rd.pt", "odd_37x53", 4.5, "constriction"),
          ("rd.pt", "rgba_48x32", 8, "arithmetic-compressor"),
          ("hyper.pt", "rgb_64x48", 1, "constriction"), ("hyper.pt", "odd_37x53", 3.37, "constriction"),
          ("hyper.pt", "gray_40x40", 8, "constriction"), ("hyper.pt", "rgba_48x32", 6, "arithmetic-compressor"),
          ("hyper.pt", "dot_1x1", 2, "constriction"),
          ("rd.pt", "rgb_256x192", 8, "constriction"), ("hyper.pt", "rgb_256x192", 8, "constriction"),
          ("hyper.pt", "rgb_256x192", 1.5, "constriction"),
          ("ctx.pt", "rgb_64x48", 1, "constriction"), ("ctx.pt", "odd_37x53", 3.37, "constriction"),
          ("ctx.pt", "gray_40x40", 8, "arithmetic-compressor"), ("ctx.pt", "rgba_48x32", 6, "constriction"),
          ("ctx.pt", "dot_1x1", 2, "constriction"), ("ctx.pt", "rgb_256x192", 5.5, "constriction")]
FILES = ([(*f, 4) for f in LEGACY] + [("rd.pt", "odd_37x53", 3, "constriction", 3), ("hyper.pt", "rgb_64x48", 5, "constriction", 3)]
         + [(*f, codec.VERSION) for f in LEGACY]
         + [(w, "wide_1100x32", 4, "constriction", codec.VERSION) for w in ("rd.pt", "hyper.pt", "ctx.pt")]
         # the models shipped after format 5 (resctx.pt; resctx2.pt, resctx3.pt and resctx4.pt, fp16 weights): files in the current version only
         + [(weights, source, quality, coder, codec.VERSION) for weights in ("resctx.pt", "resctx2.pt", "resctx3.pt", "resctx4.pt") for source, quality, coder in
            [("rgb_64x48", 1, "constriction"), ("odd_37x53", 3.37, "arithmetic-compressor"), ("gray_40x40", 8, "constriction"),
             ("rgba_48x32", 6, "constriction"), ("rgb_256x192", 5.5, "constriction"), ("wide_1100x32", 4, "constriction")]])


def sha(data):
    """Hex SHA-256 of bytes."""
    return hashlib.sha256(data).hexdigest()


def image_digest(rgb, mode, alpha):
    """SHA-256 of a decoded image: mode, RGB bytes and alpha bytes."""
    return sha(mode.encode() + np.ascontiguousarray(rgb).tobytes() + (b"" if alpha is None else alpha.tobytes()))


def latent_digest(latents):
    """SHA-256 of a latents dict: integer latents as int32, ctx's fixed-point ones (μ + whole steps, float64) as
    int64 multiples of 2^-MEAN_BITS."""
    parts = [v.numpy().astype(np.int32) if v.dtype != torch.float64 else np.round(v.numpy() * 2**MEAN_BITS).astype(np.int64)
             for _, v in sorted(latents.items())]
    return sha(b"".join(p.tobytes() for p in parts))


def save_decoded(decoded, path):
    """A decoded image (RGB, mode, alpha) as the PNG the file's mode makes."""
    from imagefiles import to_pil

    os.makedirs(os.path.dirname(path), exist_ok=True)
    to_pil(*decoded).save(path)


def make_sources(out):
    """Crop the source images from images/kodim23.png (alpha: a gradient) and save them as PNG."""
    with Image.open(os.path.join(ROOT, "images", "kodim23.png")) as im:
        full = im.convert("RGB")
    for name, top, left, h, w, mode in SOURCES:
        crop = Image.new("RGB", (w, h))
        for x in range(0, w, full.width):  # wider than the photo: its rows repeated side by side
            crop.paste(full.crop((left, top, left + min(w - x, full.width), top + h)), (x, 0))
        if mode == "L":
            crop = crop.convert("L")
        if mode == "RGBA":
            crop.putalpha(Image.fromarray((np.add.outer(np.arange(h) * 5, np.arange(w) * 3) % 256).astype(np.uint8)))
        crop.save(os.path.join(out, name + ".png"))


def legacy(data, version, latent_bytes):
    """The same file as an older format version with another payload (CRC recomputed)."""
    header, _, alpha = codec.unpack(data)
    return codec.pack(header, latent_bytes, alpha, version)


def make_file(model, mid, weights, source, quality, coder, version, out):
    """Code one source image into out/, save its decoded image; its manifest entry."""
    rgb, mode, alpha, _ = read_image(os.path.join(out, source + ".png"))
    data = codec.compress(model, mid, rgb, mode, alpha, quality, coder)
    if version < codec.VERSION:  # one tile, the whole image; version 3 with the range coder
        q, used = model.quality_of(model.rate_param(quality)), codec.RANGE_CODER if version == 3 else coder
        whole = model.write_latents(codec.latents_of(model, rgb, q), q, lambda segs: codec.entropy_encode(segs, used))
        data = legacy(data, version, whole)
    name = entry_name(weights, source, quality, coder, version)
    with open(os.path.join(out, name), "wb") as f:
        f.write(data)
    _, lat, _ = codec.read_latents(model, mid, data)
    decoded = codec.decompress(model, mid, data)
    save_decoded(decoded, os.path.join(out, "decoded", name + ".png"))
    print(f"{name}: {len(data)} bytes")
    return {"file": name, "source": source + ".png", "weights": weights, "quality": quality, "coder": coder,
            "version": version, "model_id": mid.hex(), "sha256_file": sha(data),
            "sha256_image": image_digest(*decoded), "sha256_latents": latent_digest(lat)}


def entry_name(weights, source, quality, coder, version):
    """The corpus file name of one FILES entry."""
    return f"{os.path.splitext(weights)[0]}_{source}_q{quality}_{coder[:5]}_v{version}.qae"


def main(argv=None):
    """Write sources, files and manifest.json into --out."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--out", default=os.path.join(ROOT, "tests", "conformance"), help="corpus folder")
    p.add_argument("--missing", action="store_true",
                   help="write only the files the manifest lacks (a newly shipped model's) and keep every recorded "
                        "file and entry as it is: re-coding on another CPU changes the float synthesis' decoded PNGs")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    manifest = os.path.join(args.out, "manifest.json")
    entries = []
    if args.missing and os.path.exists(manifest):
        with open(manifest) as f:
            entries = json.load(f)
    if not entries:
        make_sources(args.out)
    recorded, models = {e["file"] for e in entries}, {}
    for weights, source, quality, coder, version in FILES:
        if entry_name(weights, source, quality, coder, version) in recorded:
            continue
        if weights not in models:
            model, ckpt = load_checkpoint(os.path.join(ROOT, "weights", weights))
            models[weights] = model, bytes.fromhex(ckpt["model_id"])
        entries.append(make_file(*models[weights], weights, source, quality, coder, version, args.out))
    with open(manifest + ".tmp", "w") as f:
        json.dump(entries, f, indent=1)
        f.write("\n")
    os.replace(manifest + ".tmp", manifest)


if __name__ == "__main__":
    main()
