"""Shrink a folder of training photos into a small copy (e.g. to upload it to a GPU machine).

  python tools/prepare_photos.py PHOTOS data/train272      # short side ≤ 272 px, WebP q90

Every photo is area-downscaled so its short side is at most --short-side (smaller ones are kept at
their size) and re-encoded; train.py's own random 0.5–1 downscale then hides the re-encoding. This is
how the GPU stages of weights/hyper.pt got 1,400 photos into a 64 MiB upload (38 MB).
"""
import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from PIL import Image  # noqa: E402
from tqdm import tqdm  # noqa: E402

from imagefiles import atomic_write, list_images, read_rgb  # noqa: E402
from runtime import HelpFormatter  # noqa: E402

FORMATS = {"webp": "WEBP", "jpg": "JPEG"}


def parse_args(argv=None):
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("src", help="folder of photos (searched recursively)")
    p.add_argument("dst", help="output folder (created); files are numbered 0000.webp, 0001.webp, … in sorted order")
    p.add_argument("--short-side", type=int, default=272, help="largest short side in pixels (crops of 256 still fit)")
    p.add_argument("--format", default="webp", choices=tuple(FORMATS), help="output format")
    p.add_argument("--quality", type=int, default=90, help="encoder quality 1–100")
    return p.parse_args(argv)


def shrink(img, short_side):
    """Area-downscale an RGB array so its short side is at most short_side; a PIL image."""
    im = Image.fromarray(img)
    s = short_side / min(im.size)
    return im if s >= 1 else im.resize((round(im.width * s), round(im.height * s)), Image.Resampling.BOX)


def main(argv=None):
    """Shrink and re-encode every photo of src into dst; prints the total size."""
    args = parse_args(argv)
    paths = list_images(args.src)
    if not paths:
        sys.exit(f"error: no photos in {args.src!r}")
    os.makedirs(args.dst, exist_ok=True)
    total = 0
    for i, path in enumerate(tqdm(paths, desc="photos")):
        try:
            im = shrink(read_rgb(path), args.short_side)
        except ValueError as e:
            print(f"skipped: {e}", file=sys.stderr)
            continue
        out = os.path.join(args.dst, f"{i:04d}.{args.format}")
        atomic_write(out, lambda f, im=im: im.save(f, format=FORMATS[args.format], quality=args.quality))
        total += os.path.getsize(out)
    print(f"{len(paths)} photos → {args.dst} ({total / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
