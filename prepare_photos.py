"""Shrink a folder of training photos into a small copy (e.g. to upload it to a GPU machine).

  python prepare_photos.py ../shared/data/train data/train272      # short side ≤ 272 px, WebP q90

Every photo is area-downscaled so its short side is at most --short-side (smaller ones are kept at
their size) and re-encoded; train.py's own random 0.5–1 downscale then hides the re-encoding. This is
how the GPU stages of weights/hyper.pt got 1,400 photos into a 64 MiB upload (38 MB).
"""
import argparse
import os
import sys

import cv2
from tqdm import tqdm

from dataset import list_images

ENCODERS = {"webp": cv2.IMWRITE_WEBP_QUALITY, "jpg": cv2.IMWRITE_JPEG_QUALITY}


def parse_args(argv=None):
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="folder of photos (searched recursively)")
    p.add_argument("dst", help="output folder (created); files are numbered 0000.webp, 0001.webp, … in sorted order")
    p.add_argument("--short-side", type=int, default=272, help="largest short side in pixels (crops of 256 still fit)")
    p.add_argument("--format", default="webp", choices=tuple(ENCODERS), help="output format")
    p.add_argument("--quality", type=int, default=90, help="encoder quality 1–100")
    return p.parse_args(argv)


def shrink(img, short_side):
    """Area-downscale an image so its short side is at most short_side."""
    h, w = img.shape[:2]
    s = short_side / min(h, w)
    if s >= 1:
        return img
    return cv2.resize(img, (round(w * s), round(h * s)), interpolation=cv2.INTER_AREA)


def main(argv=None):
    """Shrink and re-encode every photo of src into dst; prints the total size."""
    args = parse_args(argv)
    paths = list_images(args.src)
    if not paths:
        sys.exit(f"error: no photos in {args.src!r}")
    os.makedirs(args.dst, exist_ok=True)
    total = 0
    for i, path in enumerate(tqdm(paths, desc="photos")):
        img = cv2.imread(path, cv2.IMREAD_COLOR)  # grayscale files come back as 3 equal channels
        if img is None:
            print(f"skipped {path}: not a readable image", file=sys.stderr)
            continue
        out = os.path.join(args.dst, f"{i:04d}.{args.format}")
        if not cv2.imwrite(out, shrink(img, args.short_side), [ENCODERS[args.format], args.quality]):
            sys.exit(f"error: could not write {out}")
        total += os.path.getsize(out)
    print(f"{len(paths)} photos → {args.dst} ({total / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
