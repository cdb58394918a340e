"""Check that files decode identically across devices: CPU-made files decoded on a GPU (and back).

  python tools/gpu_check.py                            # weights/hyper.pt, images/, qualities 1 4 8, on cuda
  python tools/gpu_check.py --weights weights/rd.pt --out results/gpu_check.json

Per image and quality it compresses on the CPU and on the device, and reports whether the files are
the same, how many latents the device's float encoder rounded differently, whether CPU-made files
decode to identical latents on the device (they must: only integer tables and integer arithmetic
decide a symbol), the largest pixel difference between CPU and device decoding, and whether
device-made files decode on the CPU. Then the device's median encode / decode time on one image.
"""
import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from checkpoint import load_checkpoint  # noqa: E402
from codec import compress, decompress, read_latents  # noqa: E402
from imagefiles import list_images, read_image  # noqa: E402
from runtime import HelpFormatter, resolve_device  # noqa: E402


def parse_args(argv=None):
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--weights", default=os.path.join(ROOT, "weights", "hyper.pt"), help="rd or hyper checkpoint")
    p.add_argument("--images", default=os.path.join(ROOT, "images"), help="folder of test images")
    p.add_argument("--qualities", default="1,4,8", help="comma-separated qualities")
    p.add_argument("--device", default="cuda", help="the device to compare with the CPU")
    p.add_argument("--out", default=None, help="also write the JSON here")
    return p.parse_args(argv)


def compare(cpu, dev, mid, rgb, quality):
    """Figures of one image at one quality (dict)."""
    f_cpu, f_dev = compress(cpu, mid, rgb, quality=quality), compress(dev, mid, rgb, quality=quality)
    l_cpu, l_dev_file = read_latents(cpu, mid, f_cpu)[1], read_latents(cpu, mid, f_dev)[1]
    l_on_dev = read_latents(dev, mid, f_cpu)[1]
    a, b = decompress(cpu, mid, f_cpu)[0], decompress(dev, mid, f_cpu)[0]
    return {"same_file": f_cpu == f_dev,
            "latents_differing": {k: int((l_cpu[k] != l_dev_file[k]).sum()) for k in l_cpu},
            "latents_total": {k: l_cpu[k].numel() for k in l_cpu},
            "symbols_same_decoding_on_device": all(torch.equal(l_cpu[k].cpu(), l_on_dev[k].cpu()) for k in l_cpu),
            "max_pixel_diff_cpu_vs_device_decode": int(np.abs(a.astype(int) - b.astype(int)).max()),
            "device_file_decodes_on_cpu": decompress(cpu, mid, f_dev)[0].shape == rgb.shape}


def device_speed(dev, mid, rgb, sync, runs=10):
    """Median (encode, decode) seconds on the device at quality 4, after three warm-up runs."""
    for _ in range(3):
        decompress(dev, mid, compress(dev, mid, rgb, quality=4))
    enc, dec = [], []
    for _ in range(runs):
        sync()
        t = time.perf_counter()
        data = compress(dev, mid, rgb, quality=4)
        sync()
        enc.append(time.perf_counter() - t)
        t = time.perf_counter()
        decompress(dev, mid, data)
        sync()
        dec.append(time.perf_counter() - t)
    return float(np.median(enc)), float(np.median(dec))


def main(argv=None):
    """Run the comparison and print (and optionally write) the JSON."""
    args = parse_args(argv)
    try:
        device = resolve_device(args.device)
    except ValueError as e:
        sys.exit(f"error: {e}")
    cpu, ckpt = load_checkpoint(args.weights, "cpu")
    dev = load_checkpoint(args.weights, device)[0]
    mid = bytes.fromhex(ckpt["model_id"])
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    paths = list_images(args.images)
    if not paths:
        sys.exit(f"error: no images in {args.images!r}")
    out = {}
    for path in paths:
        rgb = read_image(path)[0]
        for q in (float(v) for v in args.qualities.split(",")):
            out[f"{path}@q{q:g}"] = compare(cpu, dev, mid, rgb, q)
    out["device_median_encode_s"], out["device_median_decode_s"] = device_speed(dev, mid, read_image(paths[-1])[0], sync)
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0 if all(v["symbols_same_decoding_on_device"] for k, v in out.items() if isinstance(v, dict)) else 1


if __name__ == "__main__":
    sys.exit(main())
