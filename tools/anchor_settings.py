"""Which encoder settings make a classic codec's PSNR-best anchor: BD-rate of setting variants against the
stock setting of the same codec, on a folder of photos (bytes of the real files, RGB PSNR, pchip).

  python tools/anchor_settings.py --data KODAK --limit 4 --codec avif
  python tools/anchor_settings.py --data KODAK --limit 4 --codec heic --variants stock,slow-psnr,slow-psnr-rgb

Each variant is a set of Pillow save options (VARIANTS below); the qualities are the benchmark's for the codec.
Encoders run with one thread, so the timings compare variants, not machines.
"""
import argparse
import io
import os
import sys
import time

import numpy as np
from PIL import Image
from tqdm import tqdm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import metrics  # noqa: E402
from classic import CLASSIC, plugin  # noqa: E402
from imagefiles import list_images, read_image  # noqa: E402
from runtime import HelpFormatter  # noqa: E402

AVIF = {"subsampling": "4:4:4", "speed": 4, "max_threads": 1}
HEIC = {"chroma": 444}
# codec → (Pillow format, plugin, qualities of this CLASSIC entry, {variant: save options}); the first is the stock one.
VARIANTS = {
    "avif": ("AVIF", None, "avif4", {  # speed 4
        "stock": AVIF,
        "psnr": {**AVIF, "advanced": {"tune": "psnr"}},
        "psnr-limited": {**AVIF, "range": "limited", "advanced": {"tune": "psnr"}},
        "psnr-deltaq0": {**AVIF, "advanced": {"tune": "psnr", "deltaq-mode": "0"}},
        "psnr-qm": {**AVIF, "advanced": {"tune": "psnr", "enable-qm": "1"}},
    }),
    "heic": ("HEIF", "pillow_heif", "heic", {
        "stock": HEIC,
        "fast": {**HEIC, "enc_params": {"preset": "fast"}},
        "slow-psnr": {**HEIC, "enc_params": {"preset": "slow", "tune": "psnr"}},
        "slower-psnr": {**HEIC, "enc_params": {"preset": "slower", "tune": "psnr"}},
        "slow-psnr-bt709": {**HEIC, "matrix_coefficients": 1, "enc_params": {"preset": "slow", "tune": "psnr"}},
        "slow-psnr-rgb": {**HEIC, "matrix_coefficients": 0, "enc_params": {"preset": "slow", "tune": "psnr"}},
    }),
    "jxl": ("JXL", "pillow_jxl", "jxl", {
        "stock": {"num_threads": 1},  # the plugin's default effort, 7
        "effort5": {"effort": 5, "num_threads": 1},
        "effort9": {"effort": 9, "num_threads": 1},
        "original-profile": {"use_original_profile": True, "num_threads": 1},  # no XYB: its only other knob
    }),
}


def curve(fmt, options, qualities, images, desc):
    """(mean bpp, mean PSNR) per quality and the mean encode seconds per image."""
    points, seconds = [], 0.0
    for q in tqdm(qualities, desc=desc, leave=False):
        rows = []
        for rgb in images:
            buf = io.BytesIO()
            t = time.perf_counter()
            Image.fromarray(rgb).save(buf, fmt, quality=q, **{k: dict(v) if isinstance(v, dict) else v for k, v in options.items()})
            seconds += time.perf_counter() - t
            data = buf.getvalue()
            rows.append(metrics.score(rgb, np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), len(data)))
        points.append((np.mean([r["bpp"] for r in rows]), np.mean([r["psnr"] for r in rows])))
    return points, seconds / (len(qualities) * len(images))


def main(argv=None):
    """Measure the variants and print a table of BD-rates against the first."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--data", default=os.path.join(ROOT, "images"), help="folder of test photos")
    p.add_argument("--limit", type=int, default=4, help="use only the first N photos (0 = all)")
    p.add_argument("--codec", default="avif", choices=tuple(VARIANTS), help="which codec's settings to compare")
    p.add_argument("--variants", default=None, help="comma-separated subset of the codec's variants (default: all)")
    args = p.parse_args(argv)
    fmt, module, entry, variants = VARIANTS[args.codec]
    if module and plugin(module) is None:
        sys.exit(f"error: the Pillow plugin {module!r} is not installed")
    names = args.variants.split(",") if args.variants else list(variants)
    unknown = [n for n in names if n not in variants]
    if unknown:
        sys.exit(f"error: unknown variant(s) {', '.join(unknown)} (choose from {', '.join(variants)})")
    paths = list_images(args.data)[: args.limit or None]
    if not paths:
        sys.exit(f"error: no images in {args.data!r}")
    images = [read_image(path)[0] for path in paths]
    import bjontegaard

    results = {n: curve(fmt, variants[n], CLASSIC[entry][3], images, n) for n in names}
    ref = results[names[0]][0]
    print(f"{args.codec} on {len(images)} photos of {args.data}, BD-rate against {names[0]!r} (negative = smaller files)")
    print("| variant | BD-rate | encode s / image | PSNR range (dB) |\n|---|---|---|---|")
    for n in names:
        pts, sec = results[n]
        try:
            bd = 0.0 if n == names[0] else bjontegaard.bd_rate(
                [b for b, _ in ref], [q for _, q in ref], [b for b, _ in pts], [q for _, q in pts], method="pchip",
                require_matching_points=False)
            cell = f"{bd:+.1f} %"
        except ValueError:  # a curve whose PSNR does not rise with the rate has no BD-rate
            cell = "n/a (PSNR not monotonic in rate)"
        print(f"| {n} | {cell} | {sec:.2f} | {pts[0][1]:.1f} – {pts[-1][1]:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
