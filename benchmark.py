"""Rate–distortion and speed benchmark of our checkpoints against classic codecs (through Pillow).

  python benchmark.py --data KODAK --out results/kodak          # every codec on a folder of photos
  python benchmark.py --data DIR --out DIR --codecs ours,jpeg420,webp,avif --extra published/*.json
  python benchmark.py --out results/kodak --report-only           # rebuild the tables from OUT/*.json

Writes to --out: one CompressAI-format JSON per codec, points.csv, rd_psnr.png, rd_msssim.png,
bd_rates.md (BD-rate against --anchor, `bjontegaard` package, pchip), head_to_head.md (each of our
models against each other codec over their common PSNR range) and visual.png (the same crop from
every codec at nearly the same bpp). Results are cached per codec in OUT/cache/, so a re-run with
one more codec only computes that one.

Timing: classic codecs are timed in memory (PIL image → bytes → RGB array). Ours is timed like a
user runs it: encode = compress + write the .qae file, decode = read it + decompress + write a PNG.
"""
import argparse
import csv
import glob
import json
import math
import os
import re
import statistics
import sys
import time

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import metrics
from checkpoint import load_checkpoint
from classic import CLASSIC, decode as classic_decode, plugin as plugin_of
from codec import VERSION, compress, decompress, decompress_file
from effort import LEVELS as effort_levels_table
from imagefiles import atomic_write, list_images, read_image
from runtime import HelpFormatter, keep_freed_memory

ROOT = os.path.dirname(os.path.abspath(__file__))  # the shipped weights are found from here

MAX_PLOT_BPP = 2.0


def parse_args(argv=None):
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--data", default=os.path.join(ROOT, "images"),
                   help="folder of test images (Kodak: see the README for where to get it)")
    p.add_argument("--out", default="benchmark_out", help="output folder")
    p.add_argument("--codecs", default="ours,jpeg420,jpeg444,webp,avif,avif4,jxl,heic,jpeg2000",
                   help=f"comma-separated subset of: ours, {', '.join(CLASSIC)}")
    p.add_argument("--weights", nargs="*", default=None,
                   help="our checkpoints (default: every weights/*.pt)")
    p.add_argument("--qualities", default="1,2,3,4,5,6,7,8", help="qualities of our rd / hyper checkpoints")
    p.add_argument("--effort", type=int, default=0, help="encoder effort of our checkpoints (0 … 9; curves named ours-NAME-eN)")
    p.add_argument("--extra", nargs="*", default=[], help="published results JSON files (CompressAI format) to plot and rate")
    p.add_argument("--anchor", default="jpeg420", help="codec name (or extra JSON name) the BD-rates are measured against")
    p.add_argument("--visual-image", default=None, help="stem of the image for visual.png (default: kodim23 or the first)")
    p.add_argument("--visual-bpp", type=float, default=0.35, help="target bpp of the visual comparison")
    p.add_argument("--limit", type=int, default=0, help="use only the first N images (0 = all)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--no-cache", action="store_true", help="recompute every codec")
    p.add_argument("--report-only", action="store_true",
                   help="code nothing: rebuild points.csv, the plots and the tables from the JSONs already in --out "
                        "(and visual.png, coding only its image once per codec, when --data holds it)")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- measuring
def measure_point(encode, decode, images, desc):
    """Encode and decode every image at one setting; per-image metrics and times."""
    rows = []
    for name, rgb in tqdm(images, desc=desc, leave=False):
        t = time.perf_counter()
        data = encode(rgb)
        t_enc = time.perf_counter() - t
        t = time.perf_counter()
        out = decode(data)
        t_dec = time.perf_counter() - t
        rows.append({"image": name, **metrics.score(rgb, out, len(data)), "encode_s": t_enc, "decode_s": t_dec})
    return rows


def classic_points(name, images):
    """Per-quality rows of a classic codec."""
    label, plugin, encoder, qualities = CLASSIC[name]
    points = []
    for q in qualities:
        rows = measure_point(lambda rgb: encoder(Image.fromarray(rgb), q),
                             classic_decode,
                             images, f"{name} q={q}")
        points.append({"quality": q, "rows": rows})
    return label, points


def our_points(path, images, qualities, tmp, effort=0):
    """Per-quality rows of one of our checkpoints at an encoder effort, timed with file I/O like test.py."""
    model, ckpt = load_checkpoint(path)
    mid = bytes.fromhex(ckpt["model_id"])
    qualities = model.ladder(qualities)
    qae, png = os.path.join(tmp, "x.qae"), os.path.join(tmp, "x.png")

    def encode(rgb, q):
        atomic_write(qae, compress(model, mid, rgb, quality=q, effort=effort))
        return open(qae, "rb").read()

    def decode(_):
        with open(qae, "rb") as f:
            rgb = decompress_file(model, mid, f.read(), png)
        return read_image(png)[0] if rgb is None else rgb  # a large image went out in strips

    points = [{"quality": q, "rows": measure_point(lambda rgb, q=q: encode(rgb, q), decode, images,
                                                   f"{os.path.basename(path)} q={q}")} for q in qualities]
    label = f"ours: {os.path.basename(path)} ({ckpt['kind']}, step {ckpt.get('step', '?')}" + (
        f", effort {effort})" if effort else ")")
    return label, points, ckpt["model_id"]


def summarise(name, label, points):
    """CompressAI-format results dict of per-quality points (means over images), per-image values kept."""
    keys = {"bpp": "bpp", "psnr": "psnr-rgb", "ms_ssim": "ms-ssim-rgb", "ms_ssim_db": "ms-ssim-rgb-db",
            "ssim": "ssim-rgb", "encode_s": "encoding_time", "decode_s": "decoding_time"}
    results = {v: [float(np.nanmean([r[k] for r in p["rows"]])) for p in points] for k, v in keys.items()}
    results["encoding_time_median"] = [statistics.median(r["encode_s"] for r in p["rows"]) for p in points]
    results["decoding_time_median"] = [statistics.median(r["decode_s"] for r in p["rows"]) for p in points]
    results["quality"] = [p["quality"] for p in points]
    return {"name": name, "description": label, "results": results,
            "per_image": [{"quality": p["quality"], "images": p["rows"]} for p in points]}


# ----------------------------------------------------------------------------- reporting
def bd_rate(anchor, test):
    """(BD-rate % of test against anchor on bpp/PSNR (pchip) or None, note on the PSNR-range overlap)."""
    import warnings

    import bjontegaard

    a = sorted(zip(anchor["bpp"], anchor["psnr-rgb"]))
    t = sorted(zip(test["bpp"], test["psnr-rgb"]))
    if len(a) < 2 or len(t) < 2:
        return None, "too few points"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            value = float(bjontegaard.bd_rate([p[0] for p in a], [p[1] for p in a], [p[0] for p in t],
                                              [p[1] for p in t], method="pchip", require_matching_points=False))
        except Exception as e:
            return None, f"not comparable ({type(e).__name__})"
    overlap = [re.search(r"overlap: '([0-9.]+)'", str(w.message)) for w in caught if "overlap" in str(w.message)]
    return value, (f"PSNR ranges overlap by {overlap[0].group(1) if overlap[0] else 'under 75'} %" if overlap else "")


def load_extra(path):
    """A published results JSON (CompressAI format) as a curve dict."""
    with open(path) as f:
        d = json.load(f)
    r = d["results"]
    name = os.path.splitext(os.path.basename(path))[0]  # CompressAI's own names are not unique
    if "ms-ssim-rgb" in r and "ms-ssim-rgb-db" not in r:
        r["ms-ssim-rgb-db"] = [metrics.ms_ssim_db(v) for v in r["ms-ssim-rgb"]]
    return {"name": f"{name} (published)", "description": f"{name} (published)", "results": r}


def write_reports(curves, anchor_name, out):
    """points.csv, the two RD plots and the BD-rate table (printed and as markdown)."""
    with open(os.path.join(out, "points.csv"), "w", newline="") as f:
        w = csv.writer(f)
        cols = ["bpp", "psnr-rgb", "ms-ssim-rgb", "ms-ssim-rgb-db", "ssim-rgb", "encoding_time", "decoding_time"]
        w.writerow(["codec", "quality"] + cols)
        for c in curves:
            r = c["results"]
            for i in range(len(r["bpp"])):
                w.writerow([c["name"], r.get("quality", [""] * len(r["bpp"]))[i]] + [r.get(k, [""] * len(r["bpp"]))[i] for k in cols])
    plot(curves, "psnr-rgb", "PSNR (dB, RGB)", os.path.join(out, "rd_psnr.png"))
    plot(curves, "ms-ssim-rgb-db", "MS-SSIM (dB)", os.path.join(out, "rd_msssim.png"))
    anchor = next((c for c in curves if c["name"] == anchor_name or c["name"].startswith(anchor_name)), None)
    lines = [f"| codec | BD-rate vs {anchor_name} (PSNR) | bpp range | note |", "|---|---|---|---|"]
    for c in curves:
        r = c["results"]
        bd, note = bd_rate(anchor["results"], r) if anchor else (None, f"no anchor {anchor_name!r}")
        lines.append(f"| {c['description'] or c['name']} | {'n/a' if bd is None else f'{bd:+.1f} %'} "
                     f"| {min(r['bpp']):.3f} – {max(r['bpp']):.3f} | {note} |")
    table = "\n".join(lines)
    print(table)
    ours = [c for c in curves if c["name"].startswith("ours-")]
    curved = [c for c in curves if len(c["results"]["bpp"]) > 1]  # a one-rate model has no curve
    duel = head_to_head([c for c in curved if c["name"].startswith("ours-")], curved)
    print(duel)
    atomic_write(os.path.join(out, "bd_rates.md"), (table + "\n").encode())
    atomic_write(os.path.join(out, "head_to_head.md"), duel.encode())
    atomic_write(os.path.join(out, "ours.md"), points_table(ours).encode())
    if ours:  # against effort 0 of our first checkpoint (when it is there)
        write_tradeoff(curved, next((c for c in ours if not re.search(r"-e\d+$", c["name"])), ours[0]), out)


def write_tradeoff(curves, reference, out):
    """speed_tradeoff.md / .png: BD-rate against our first curve (effort 0 when run so) and median encode
    seconds of every curve — the speed–compression trade-off of our effort levels and the codecs' speeds."""
    rows = []
    for c in (c for c in curves if "encoding_time_median" in c["results"]):  # published curves carry no times
        r = c["results"]
        bd, note = bd_rate(reference["results"], r) if c is not reference else (0.0, "reference")
        rows.append((short_label(c), bd, statistics.median(r["encoding_time_median"]),
                     statistics.median(r["decoding_time_median"]), note))
    rows.sort(key=lambda row: row[2])
    lines = [f"| codec | BD-rate vs {reference['name']} | encode s | decode s | note |", "|---|---|---|---|---|"]
    lines += [f"| {n} | {'n/a' if bd is None else f'{bd:+.1f} %'} | {e:.2f} | {d:.3f} | {note} |" for n, bd, e, d, note in rows]
    atomic_write(os.path.join(out, "speed_tradeoff.md"), ("\n".join(lines) + "\n").encode())
    plot_tradeoff(rows, reference["name"], os.path.join(out, "speed_tradeoff.png"))


def short_label(curve):
    """"ours: hyper, effort 3" for our curves, the codec's own description for the others."""
    if not curve["name"].startswith("ours-"):
        return curve["description"] or curve["name"]
    stem, effort = our_curve_name(curve["name"])
    return f"ours: {stem}, effort {effort}"


def our_curve_name(name):
    """"ours-STEM-eN" → (STEM, N), "ours-STEM" → (STEM, 0): the checkpoint and effort a curve was made with."""
    found = re.match(r"ours-(.*?)(?:-e(\d+))?$", name)
    return found.group(1), int(found.group(2) or 0)


def plot_tradeoff(rows, reference, path):
    """Encode seconds (log scale) against BD-rate, one labelled point per curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, bd, enc, _, _ in rows:
        if bd is not None:
            ax.plot(enc, bd, "o", color="C0" if name.startswith("ours") else "C1")
            ax.annotate(name.replace("ours: ", ""), (enc, bd), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("median encode seconds per image (log scale)")
    ax.set_ylabel(f"BD-rate vs {reference} (%, lower = smaller files)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def head_to_head(ours, others):
    """Markdown table: BD-rate of each of our curves (columns) against every curve (rows: classic codecs, our
    other checkpoints, published ones) over their common PSNR range; negative = fewer bits at equal PSNR."""
    lines = ["| codec | " + " | ".join(c["name"].removeprefix("ours-") for c in ours) + " |",
             "|---|" + "---|" * len(ours)]
    for other in others:
        cells = []
        for c in ours:
            bd, note = bd_rate(other["results"], c["results"]) if c is not other else (None, "")
            cells.append("–" if c is other else "n/a" if bd is None else f"{bd:+.1f} %" + (" *" if note else ""))
        lines.append(f"| {other['description'] or other['name']} | " + " | ".join(cells) + " |")
    marked = any(line.endswith(" *") or " * |" in line for line in lines[2:])
    return "\n".join(lines) + ("\n\n* the two PSNR ranges overlap little: the figure covers that overlap only\n" if marked else "\n")


def load_curves(out):
    """The curves a previous run wrote to OUT/*.json (for --report-only)."""
    curves = []
    for path in sorted(glob.glob(os.path.join(out, "*.json"))):
        with open(path) as f:
            curves.append(json.load(f))
    return curves


def points_table(curves):
    """Markdown table of every point of the given curves (means over the images, median times)."""
    lines = ["| model | quality | bpp | PSNR (dB) | MS-SSIM | SSIM | encode s | decode s |", "|---|---|---|---|---|---|---|---|"]
    for c in curves:
        r = c["results"]
        for i in range(len(r["bpp"])):
            q = r["quality"][i]
            lines.append(f"| {c['name'].removeprefix('ours-')} | {'–' if q is None else q} | {r['bpp'][i]:.3f} "
                         f"| {r['psnr-rgb'][i]:.2f} | {r['ms-ssim-rgb'][i]:.4f} | {r['ssim-rgb'][i]:.4f} "
                         f"| {r['encoding_time_median'][i]:.3f} | {r['decoding_time_median'][i]:.3f} |")
    return "\n".join(lines) + "\n"


def plot(curves, key, ylabel, path):
    """One bpp-vs-metric plot of every curve that has the metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 6))
    shown = []  # metric values inside the plotted bpp range, to fit the y axis to them
    colours = iter(plt.get_cmap("tab20").colors * 3)  # 20 colours: no two nearby curves share one
    for c in curves:
        r = c["results"]
        if key not in r:
            continue
        pts = sorted((b, v) for b, v in zip(r["bpp"], r[key]) if v is not None and not math.isnan(v))
        ours, published = c["name"].startswith("ours-"), c["name"].endswith("(published)")
        style = "--" if published else "-o" if ours else "-s"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=c["description"] or c["name"], ms=3,
                color=next(colours), lw=2.2 if ours else 1.0, alpha=0.6 if published else 1.0)  # ours stand out
        shown += [v for b, v in pts if b <= MAX_PLOT_BPP]
    ax.set_xlabel("bits per pixel (real file size)")
    ax.set_ylabel(ylabel)
    ax.set_xlim(0, MAX_PLOT_BPP)
    if shown:
        ax.set_ylim(min(shown) - 0.5, max(shown) + 0.5)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def visual(curves, images, coders, stem, target_bpp, path, crop=256, columns=5):
    """The same crop of one image from the original and every codec at its setting nearest the target bpp
    (codecs with none within a factor of 2 are left out), each labelled with its own file's bpp and PSNR."""
    from PIL import ImageDraw, ImageFont

    name, rgb = next(((n, x) for n, x in images if n == stem), images[0])
    h, w = rgb.shape[:2]
    y0, x0 = max(0, (h - crop) // 2), max(0, (w - crop) // 2)
    tiles = [("original", rgb)]
    for c in curves:
        rows = [(p["quality"], r["bpp"]) for p in c.get("per_image", []) for r in p["images"] if r["image"] == name]
        if c["name"] not in coders or not rows:
            continue
        quality, bpp = min(rows, key=lambda qb: abs(math.log(qb[1] / target_bpp)))
        if abs(math.log(bpp / target_bpp)) <= math.log(2):
            size, out = coders[c["name"]](rgb, quality)
            tiles.append((f"{short_label(c)}\n{size * 8 / (h * w):.3f} bpp, {metrics.psnr(rgb, out):.2f} dB", out))
    tiles[1:] = sorted(tiles[1:], key=lambda t: not t[0].startswith("ours"))  # ours first, in --weights order
    font, label_h = ImageFont.load_default(size=13), 36
    cols = min(columns, len(tiles))
    sheet = Image.new("RGB", (cols * (crop + 4), -(-len(tiles) // cols) * (crop + label_h + 4)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (label, img) in enumerate(tiles):
        x, y = (i % cols) * (crop + 4), (i // cols) * (crop + label_h + 4)
        sheet.paste(Image.fromarray(img[y0 : y0 + crop, x0 : x0 + crop]), (x, y + label_h))
        draw.text((x + 2, y + 3), label, fill="black", font=font)
    sheet.save(path)
    print(f"visual comparison of {name} at ~{target_bpp} bpp: {path}")


def stored_coders(curves):
    """Coders for the curves of an earlier run (--report-only): our checkpoints by name from weights/ at the
    curve's effort, the classic codecs by name; curves whose checkpoint is gone are left out."""
    coders = {}
    for c in curves:
        stem, effort = our_curve_name(c["name"]) if c["name"].startswith("ours-") else (None, 0)
        path = stem and os.path.join(ROOT, "weights", stem + ".pt")
        if path and os.path.exists(path):
            coders[c["name"]] = our_coder(*load_checkpoint(path), effort)
        elif c["name"] in CLASSIC and (not CLASSIC[c["name"]][1] or plugin_of(CLASSIC[c["name"]][1])):
            coders[c["name"]] = classic_coder(CLASSIC[c["name"]][2])
    return coders


def our_coder(model, ckpt, effort):
    """(rgb, quality) → (file bytes, decoded rgb) of one of our checkpoints at an effort."""
    mid = bytes.fromhex(ckpt["model_id"])

    def code(rgb, quality):
        data = compress(model, mid, rgb, quality=quality, effort=effort)
        return len(data), decompress(model, mid, data)[0]
    return code


def classic_coder(encoder):
    """(rgb, quality) → (file bytes, decoded rgb) of a classic codec."""
    def code(rgb, quality):
        data = encoder(Image.fromarray(rgb), quality)
        return len(data), classic_decode(data)
    return code


def strict_json(value):
    """Replace NaN (e.g. MS-SSIM of images too small for it) by null, so the JSON is standard."""
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [strict_json(v) for v in value]
    return None if isinstance(value, float) and math.isnan(value) else value


def cached(out, name, key, compute, use_cache):
    """Results of one codec from OUT/cache/NAME.json when its key matches, else computed and stored."""
    path = os.path.join(out, "cache", f"{name}.json")
    if use_cache and os.path.exists(path):
        with open(path) as f:
            d = json.load(f)
        if d.get("key") == key:
            return d["result"]
    result = compute()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write(path, json.dumps({"key": key, "result": result}).encode())
    return result


def effort_levels():
    """The search steps of every effort level: part of the cache key, so retuned levels are re-measured."""
    return [list(level) for level in effort_levels_table]


def our_curves(args, images, image_key, coders):
    """Curves of our checkpoints (--weights, default every shipped one); fills coders for the visual."""
    weights = args.weights if args.weights is not None else sorted(
        p for p in glob.glob(os.path.join(ROOT, "weights", "*.pt")) if not p.endswith("_resume.pt"))
    qualities = [float(q) for q in args.qualities.split(",")]
    curves = []
    for path in weights:
        model, ckpt = load_checkpoint(path)
        cname = "ours-" + os.path.splitext(os.path.basename(path))[0] + (f"-e{args.effort}" if args.effort else "")
        # The format version is part of the key: a new bitstream changes sizes and speeds.
        key = {"model_id": ckpt["model_id"], "format": VERSION, "qualities": qualities, "images": image_key,
               "effort": [args.effort, effort_levels()]}

        def compute(path=path, cname=cname):
            label, points, _ = our_points(path, images, qualities, os.path.join(args.out, "cache"), args.effort)
            return summarise(cname, label, points)

        curves.append(cached(args.out, cname, key, compute, not args.no_cache))
        coders[cname] = our_coder(model, ckpt, args.effort)
    return curves


def classic_curve(args, name, images, image_key, coders):
    """Curve of one classic codec (None when its Pillow plugin is missing); fills coders for the visual."""
    label, plugin, encoder, qualities = CLASSIC[name]
    if plugin and plugin_of(plugin) is None:
        print(f"skipping {name}: Pillow plugin {plugin!r} is not installed")
        return None
    key = {"qualities": qualities, "label": label, "images": image_key}
    coders[name] = classic_coder(encoder)
    return cached(args.out, name, key, lambda: summarise(name, *classic_points(name, images)), not args.no_cache)


def main(argv=None):
    """Run every requested codec over the data, then write JSONs, CSV, plots, BD-rates and the visual."""
    args = parse_args(argv)
    extras = [load_extra(p) for p in args.extra]
    if args.report_only:
        curves = load_curves(args.out)
        write_reports(curves + extras, args.anchor, args.out)
        stem = args.visual_image or "kodim23"
        coded = any(r["image"] == stem for c in curves for p in c.get("per_image", []) for r in p["images"])
        found = [p for p in list_images(args.data) if os.path.splitext(os.path.basename(p))[0] == stem] \
            if coded and os.path.isdir(args.data) else []
        if found:  # the visual needs the picture itself: one image coded once per codec
            visual(curves, [(stem, read_image(found[0])[0])], stored_coders(curves), stem, args.visual_bpp,
                   os.path.join(args.out, "visual.png"))
        return 0
    keep_freed_memory()  # as test.py does, so our timings are what a user gets
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [c.strip() for c in args.codecs.split(",") if c.strip()]
    unknown = [n for n in names if n != "ours" and n not in CLASSIC]
    if unknown:
        sys.exit(f"error: unknown codec(s) {', '.join(unknown)} (choose from ours, {', '.join(CLASSIC)})")
    paths = list_images(args.data)[: args.limit or None]
    if not paths:
        sys.exit(f"error: no images in {args.data!r}")
    images = [(os.path.splitext(os.path.basename(p))[0], read_image(p)[0]) for p in paths]
    os.makedirs(args.out, exist_ok=True)
    image_key, curves, coders = [n for n, _ in images], [], {}
    for name in names:
        found = our_curves(args, images, image_key, coders) if name == "ours" else [
            classic_curve(args, name, images, image_key, coders)]
        curves += [c for c in found if c is not None]
    for c in curves:
        atomic_write(os.path.join(args.out, f"{c['name']}.json"), json.dumps(strict_json(c), indent=1).encode())
    write_reports(curves + extras, args.anchor, args.out)
    for c in curves:
        r = c["results"]
        print(f"{c['name']:22s} median encode {statistics.median(r['encoding_time_median']):.3f} s, "
              f"decode {statistics.median(r['decoding_time_median']):.3f} s per image")
    visual(curves, images, coders, args.visual_image or "kodim23", args.visual_bpp, os.path.join(args.out, "visual.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
