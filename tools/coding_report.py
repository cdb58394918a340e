"""Entropy-coding figures of an rd, hyper or ctx checkpoint: rate honesty, coder speed, its share of the time, determinism.

  python tools/coding_report.py --data DIR                 # weights/hyper.pt, qualities 1, 4, 8
  python tools/coding_report.py --weights W --data DIR --quality 6 --limit 8

Per image and quality it measures, with the file written and read like test.py does:
  * file bits vs the bits the model's float prior estimates (rate honesty) and the header overhead;
  * entropy encode / decode seconds of both coders and their symbols per second;
  * the share of entropy coding in the model's encode (analysis + coding) and decode (coding + synthesis),
    in both together, and in the whole encode / decode as test.py runs it (reading the image, file I/O, PNG writing);
    the integer networks the coding functions call (the model's INTEGER_NETWORKS: hyper's hyper-synthesis,
    ctx's hyper-synthesis and context networks) are clocked inside each call and counted as transform; the
    mapping of latents to symbols and groups is coding;
  * decoded symbols and pixels with 1 vs 2 torch threads (symbols must be identical).
Every time is the minimum of --repeat runs (arithmetic-compressor's: one run; it is ~100 % coding).
"""
import argparse
import math
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from checkpoint import load_checkpoint  # noqa: E402
from codec import (CODERS, HEADER_BYTES, SymbolDecoder, compress_file, decompress_file, entropy_encode,  # noqa: E402
                   image_of, latents_of, read_latents)
from imagefiles import list_images, read_image  # noqa: E402
from models.transform import TransformCodec  # noqa: E402
from runtime import HelpFormatter, keep_freed_memory  # noqa: E402


def parse_args(argv=None):
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--weights", default=os.path.join(ROOT, "weights", "hyper.pt"), help="rd, hyper or ctx checkpoint")
    p.add_argument("--data", default=os.path.join(ROOT, "images"), help="folder of images (e.g. Kodak)")
    p.add_argument("--quality", type=float, nargs="+", default=[1, 4, 8], help="qualities to code at")
    p.add_argument("--limit", type=int, default=0, help="use only the first N images (0 = all)")
    p.add_argument("--repeat", type=int, default=3, help="runs per timed step; the fastest counts")
    return p.parse_args(argv)


def timed(repeat, fn, *args):
    """(result, seconds of the fastest of `repeat` calls)."""
    best = math.inf
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn(*args)
        best = min(best, time.perf_counter() - t)
    return out, best


def coding_timed(model, repeat, fn, *args):
    """(result, seconds of fn less the integer networks it runs, seconds of those networks), from the fastest
    of `repeat` calls: the networks are clocked inside each call, not estimated apart."""
    spent = []

    def clocked(inner):
        def run(*a, **k):
            t = time.perf_counter()
            out = inner(*a, **k)
            spent.append(time.perf_counter() - t)
            return out
        return run

    names = model.INTEGER_NETWORKS
    for name in names:  # instance attributes: they shadow the methods for this measurement only
        setattr(model, name, clocked(getattr(model, name)))
    try:
        best = (math.inf, 0.0)
        for _ in range(repeat):
            spent.clear()
            t = time.perf_counter()
            out = fn(*args)
            total = time.perf_counter() - t
            best = min(best, (total - sum(spent), sum(spent)))
    finally:
        for name in names:
            model.__dict__.pop(name, None)
    return (out, *best)


def segments_of(model, latents, quality):
    """The (symbols, frequencies) segments a model hands to the entropy coder for its latents."""
    segments = []
    model.write_latents(latents, quality, lambda segs: segments.extend(segs) or b"")
    return segments


def decoded_latents(model, payload, shape, quality, coder):
    """The latents a model reads back from a payload with one coder."""
    return model.read_latents(payload, shape, quality, lambda data: SymbolDecoder(data, coder))


def measure(model, mid, path, rgb, quality, repeat):
    """Figures of one image (its file and its pixels) at one quality (dict)."""
    latents, t_analysis = timed(repeat, latents_of, model, rgb, quality)
    shape = tuple(latents["y"].shape)
    segments, t_map, t_nets_enc = coding_timed(model, repeat, segments_of, model, latents, quality)
    row = {"symbols": sum(len(s) for s, f in segments if len(f) > 1)}
    for coder in CODERS:
        runs = repeat if coder == "constriction" else 1
        payload, t_enc = timed(runs, entropy_encode, segments, coder)
        decoded, t_dec, t_nets_dec = coding_timed(model, runs, decoded_latents, model, payload, shape, quality, coder)
        assert decoded.keys() == latents.keys() and all(torch.equal(decoded[k], latents[k]) for k in latents)
        row[coder] = {"enc_s": t_enc + t_map, "dec_s": t_dec}
    _, t_synthesis = timed(repeat, image_of, model, latents, *rgb.shape[:2], quality)
    data, t_user_enc, t_user_dec = user_times(model, mid, path, quality, repeat)
    row.update(file_bits=8 * len(data), payload_bits=8 * (len(data) - HEADER_BYTES),
               estimated_bits=model.estimated_bits(latents, quality), nets_s=t_nets_dec,
               analysis_s=t_analysis + t_nets_enc, synthesis_s=t_synthesis + t_nets_dec,
               user_enc_s=t_user_enc, user_dec_s=t_user_dec)
    row["threads"] = thread_difference(model, mid, data)
    return row


def user_times(model, mid, path, quality, repeat):
    """(file bytes, encode s, decode s) as test.py runs them: read the image + compress + write the .qae;
    read it + decompress + write a PNG (the default constriction coder)."""
    with tempfile.TemporaryDirectory() as tmp:
        qae, png = os.path.join(tmp, "x.qae"), os.path.join(tmp, "x.png")
        (data, _), t_enc = timed(repeat, compress_file, model, mid, path, qae, quality)

        def decode():
            with open(qae, "rb") as f:
                decompress_file(model, mid, f.read(), png)

        _, t_dec = timed(repeat, decode)
    return data, t_enc, t_dec


def thread_difference(model, mid, data):
    """(symbols identical?, largest pixel difference) between decoding with 1 and 2 torch threads."""
    before, out = torch.get_num_threads(), []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            header, latents, quality = read_latents(model, mid, data)
            out.append((latents, image_of(model, latents, header["height"], header["width"], quality)))
    finally:
        torch.set_num_threads(before)
    same = out[0][0].keys() == out[1][0].keys() and all(torch.equal(out[0][0][k], out[1][0][k]) for k in out[0][0])
    return same, int(np.abs(out[0][1].astype(int) - out[1][1].astype(int)).max())


def report(rows, quality):
    """Print the summary figures of one quality; returns whether the symbols were thread-independent."""
    ratio = [r["payload_bits"] / r["estimated_bits"] for r in rows]
    file_ratio = [r["file_bits"] / r["estimated_bits"] for r in rows]
    med = lambda key: statistics.median(r[key] for r in rows)  # noqa: E731
    print(f"quality {quality}: {len(rows)} images, {med('file_bits') / 8:,.0f} bytes and {med('symbols'):,.0f} "
          f"entropy-coder symbols per image, integer networks {1e3 * med('nets_s'):.1f} ms (medians)")
    print(f"  payload bits / estimated bits: mean {np.mean(ratio):.4f} (min {min(ratio):.4f}, max {max(ratio):.4f}); "
          f"whole file / estimated: mean {np.mean(file_ratio):.4f}; header + CRC {HEADER_BYTES} bytes")
    for coder in CODERS:
        enc, dec = (sum(r[coder][k] for r in rows) for k in ("enc_s", "dec_s"))
        n = sum(r["symbols"] for r in rows)
        shares = [100 * np.median([f(r) for r in rows]) for f in (
            lambda r: r[coder]["enc_s"] / (r[coder]["enc_s"] + r["analysis_s"]),
            lambda r: r[coder]["dec_s"] / (r[coder]["dec_s"] + r["synthesis_s"]),
            lambda r: (r[coder]["enc_s"] + r[coder]["dec_s"]) / (r[coder]["enc_s"] + r["analysis_s"] + r[coder]["dec_s"] + r["synthesis_s"]))]
        print(f"  {coder:22s} {1e3 * enc / len(rows):7.1f} / {1e3 * dec / len(rows):7.1f} ms, "
              f"{n / enc / 1e6:6.2f} / {n / dec / 1e6:6.2f} M symbols/s; share of the model's encode "
              f"{shares[0]:4.1f} %, decode {shares[1]:4.1f} %, both {shares[2]:4.1f} %")
    c = [(r["constriction"]["enc_s"], r["constriction"]["dec_s"], r["user_enc_s"], r["user_dec_s"]) for r in rows]
    print(f"  constriction's share of the whole time as test.py runs it (image reading, file I/O and PNG writing "
          f"included; {1e3 * med('user_enc_s'):.0f} / {1e3 * med('user_dec_s'):.0f} ms): encode "
          f"{100 * np.median([e / ue for e, d, ue, ud in c]):.1f} %, decode {100 * np.median([d / ud for e, d, ue, ud in c]):.1f} %, "
          f"both {100 * np.median([(e + d) / (ue + ud) for e, d, ue, ud in c]):.1f} %")
    same = all(r["threads"][0] for r in rows)
    print(f"  1 vs 2 torch threads: symbols identical in {sum(r['threads'][0] for r in rows)}/{len(rows)} images; "
          f"largest pixel difference {max(r['threads'][1] for r in rows)}")
    return same


def main(argv=None):
    """Measure every image and print the summary."""
    args = parse_args(argv)
    keep_freed_memory()  # as test.py does
    model, ckpt = load_checkpoint(args.weights)
    if not isinstance(model, TransformCodec):  # the seed's B-bit latents have no entropy model to report on
        sys.exit(f"error: {args.weights} is a {ckpt['kind']} checkpoint; this report is about the learned models' entropy coding")
    paths = list_images(args.data)[: args.limit or None]
    if not paths:
        sys.exit(f"error: no images in {args.data!r}")
    if args.repeat < 1:
        sys.exit("error: --repeat must be at least 1")
    try:
        qualities = [model.quality_of(model.rate_param(q)) for q in args.quality]
    except ValueError as e:
        sys.exit(f"error: {e}")
    mid = bytes.fromhex(ckpt["model_id"])
    print(f"{args.weights} (step {ckpt.get('step', '?')}), {torch.get_num_threads()} threads, "
          f"times: fastest of {args.repeat} runs; columns: encode / decode")
    images = [(path, read_image(path)[0]) for path in paths]
    same = True
    for quality in qualities:
        rows = [measure(model, mid, path, rgb, quality, args.repeat)
                for path, rgb in tqdm(images, desc=f"quality {quality}", leave=False)]
        same &= report(rows, quality)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
