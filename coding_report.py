"""Entropy-coding figures of an rd or hyper checkpoint: rate honesty, coder speed, its share of the time, determinism.

  python coding_report.py                                   # weights/hyper.pt on Kodak (or images/), quality 4
  python coding_report.py --weights W --data DIR --quality 6 --limit 8

Per image it measures, with the file written and read like test.py does:
  * file bits vs the bits the model's float prior estimates (rate honesty) and the header overhead;
  * entropy encode / decode seconds of both coders and their symbols per second;
  * the share of entropy coding in the model's encode (analysis + coding) and decode (coding + synthesis),
    and in the whole encode / decode as test.py runs it (with file I/O and PNG writing);
    the hyper model's integer hyper-synthesis (scale indices) is timed apart and counted as transform,
    the mapping of latents to symbols and groups as coding;
  * decoded symbols and pixels with 1 vs 2 torch threads (symbols must be identical).
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

from codec import (CODERS, HEADER_BYTES, atomic_write, compress, decompress, entropy_encode, estimated_bits, image_of,
                   latent_segments, latents_of, payload_latents, read_image, read_latents, write_image)
from dataset import list_images
from model import HyperModel, keep_freed_memory, load_checkpoint

DEFAULT_DATA = os.path.join("..", "shared", "data", "kodak")


def parse_args(argv=None):
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default=os.path.join("weights", "hyper.pt"), help="rd or hyper checkpoint")
    p.add_argument("--data", default=DEFAULT_DATA if os.path.isdir(DEFAULT_DATA) else "images",
                   help="folder of images (default: ../shared/data/kodak when present, else images/)")
    p.add_argument("--quality", type=float, default=4, help="quality to code at")
    p.add_argument("--limit", type=int, default=0, help="use only the first N images (0 = all)")
    return p.parse_args(argv)


def timed(fn, *args):
    """(result, seconds) of one call."""
    t = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t


def measure(model, mid, rgb, quality):
    """Figures of one image (dict)."""
    latents, t_analysis = timed(latents_of, model, rgb, quality)
    shape = tuple(latents["y"].shape)
    t_hyper = 0.0  # the integer hyper-synthesis, run once by the encoder and once by the decoder
    if isinstance(model, HyperModel):
        t_hyper = min(timed(model.scale_index, latents["z"][None], quality, shape[1:])[1] for _ in range(3))
    segments, t_map = timed(latent_segments, model, latents, quality)
    n = sum(len(s) for s, _ in segments)
    row = {"symbols": n, "hyper_s": t_hyper}
    for coder in CODERS:
        payload, t_enc = timed(entropy_encode, segments, coder)
        decoded, t_dec = timed(payload_latents, model, payload, shape, quality, coder)
        assert decoded.keys() == latents.keys() and all(torch.equal(decoded[k], latents[k]) for k in latents)
        row[coder] = {"enc_s": t_enc + t_map - t_hyper, "dec_s": t_dec - t_hyper}
    _, t_synthesis = timed(image_of, model, latents, *rgb.shape[:2], quality)
    data, t_user_enc, t_user_dec = user_times(model, mid, rgb, quality)
    row.update(file_bits=8 * len(data), payload_bits=8 * (len(data) - HEADER_BYTES),
               estimated_bits=estimated_bits(model, latents, quality), analysis_s=t_analysis + t_hyper,
               synthesis_s=t_synthesis + t_hyper, user_enc_s=t_user_enc, user_dec_s=t_user_dec)
    row["threads"] = thread_difference(model, mid, data)
    return row


def user_times(model, mid, rgb, quality):
    """(file bytes, encode s, decode s) as test.py runs them: compress + write the .qae; read it +
    decompress + write a PNG (the default constriction coder)."""
    with tempfile.TemporaryDirectory() as tmp:
        qae, png = os.path.join(tmp, "x.qae"), os.path.join(tmp, "x.png")
        _, t_enc = timed(lambda: atomic_write(qae, compress(model, mid, rgb, quality=quality)))
        with open(qae, "rb") as f:
            data = f.read()

        def decode():
            with open(qae, "rb") as f:
                write_image(png, *decompress(model, mid, f.read()))

        _, t_dec = timed(decode)
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


def report(rows):
    """Print the summary figures."""
    ratio = [r["payload_bits"] / r["estimated_bits"] for r in rows]
    file_ratio = [r["file_bits"] / r["estimated_bits"] for r in rows]
    print(f"images: {len(rows)}, symbols per image: {statistics.median(r['symbols'] for r in rows):,.0f}, "
          f"integer hyper-synthesis {1e3 * statistics.median(r['hyper_s'] for r in rows):.1f} ms (median)")
    print(f"payload bits / estimated bits: mean {np.mean(ratio):.4f} (min {min(ratio):.4f}, max {max(ratio):.4f}); "
          f"whole file / estimated: mean {np.mean(file_ratio):.4f}; header + CRC {HEADER_BYTES} bytes")
    for coder in CODERS:
        enc = sum(r[coder]["enc_s"] for r in rows)
        dec = sum(r[coder]["dec_s"] for r in rows)
        n = sum(r["symbols"] for r in rows)
        enc_share = np.median([r[coder]["enc_s"] / (r[coder]["enc_s"] + r["analysis_s"]) for r in rows])
        dec_share = np.median([r[coder]["dec_s"] / (r[coder]["dec_s"] + r["synthesis_s"]) for r in rows])
        print(f"{coder:22s} encode {n / enc / 1e6:7.3f} M symbols/s, decode {n / dec / 1e6:7.3f} M symbols/s; "
              f"share of encode time {100 * enc_share:5.1f} %, of decode time {100 * dec_share:5.1f} % (median)")
    enc_user = np.median([r["constriction"]["enc_s"] / r["user_enc_s"] for r in rows])
    dec_user = np.median([r["constriction"]["dec_s"] / r["user_dec_s"] for r in rows])
    print(f"constriction's share of the whole encode / decode as test.py runs it (file I/O and PNG writing "
          f"included; median {statistics.median(r['user_enc_s'] for r in rows):.3f} / "
          f"{statistics.median(r['user_dec_s'] for r in rows):.3f} s): {100 * enc_user:.1f} % / {100 * dec_user:.1f} %")
    same = all(r["threads"][0] for r in rows)
    print(f"1 vs 2 torch threads: symbols identical in {sum(r['threads'][0] for r in rows)}/{len(rows)} images; "
          f"largest pixel difference {max(r['threads'][1] for r in rows)}")
    return 0 if same else 1


def main(argv=None):
    """Measure every image and print the summary."""
    args = parse_args(argv)
    keep_freed_memory()  # as test.py does
    model, ckpt = load_checkpoint(args.weights)
    if ckpt["kind"] not in ("rd", "hyper"):
        sys.exit(f"error: {args.weights} is a {ckpt['kind']} checkpoint; this report is about the learned models' entropy coding")
    paths = list_images(args.data)[: args.limit or None]
    if not paths:
        sys.exit(f"error: no images in {args.data!r}")
    mid = bytes.fromhex(ckpt["model_id"])
    print(f"{args.weights} (step {ckpt.get('step', '?')}), quality {args.quality}, {torch.get_num_threads()} threads")
    rows = []
    for path in paths:
        rows.append(measure(model, mid, read_image(path)[0], args.quality))
        r = rows[-1]
        print(f"  {os.path.basename(path):14s} {r['file_bits'] / 8:8.0f} bytes, payload/estimate "
              f"{r['payload_bits'] / r['estimated_bits']:.4f}, constriction {r['constriction']['enc_s'] * 1e3:.1f} / "
              f"{r['constriction']['dec_s'] * 1e3:.1f} ms, threads {r['threads']}")
    return report(rows)


if __name__ == "__main__":
    sys.exit(main())
