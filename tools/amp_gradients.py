"""How far bf16 autocast moves a training gradient, against how far a new draw of noise and qualities moves it.

One batch of centre crops, one checkpoint in training mode, the gradient of its training loss computed
three times: fp32 with the batch's noise and qualities (A), fp32 with another draw of them (B), and under
CPU bf16 autocast with A's (as `train.py --amp bf16` trains). Per part of the model it prints the fp32
gradient's norm, |A − B| (the spread training lives with anyway) and |bf16 − A| (what bf16 adds). A
bf16 error far above the draw's spread means bf16 steers training somewhere else.

  python tools/amp_gradients.py                                   # weights/ctx.pt on images/
  python tools/amp_gradients.py --data data/val --keep-fp32 g_s   # the synthesis left in fp32
"""
import argparse
import contextlib
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from checkpoint import DEFAULT_WEIGHTS, load_checkpoint  # noqa: E402
from imagefiles import list_images, read_rgb  # noqa: E402
from runtime import HelpFormatter, cpu_has_bf16  # noqa: E402


def parse_args(argv=None):
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--weights", default=DEFAULT_WEIGHTS, help="checkpoint whose training gradient is measured")
    p.add_argument("--data", default=os.path.join(ROOT, "images"), help="folder of photos (centre crops of each)")
    p.add_argument("--crops", type=int, default=8, help="crops in the batch (photos smaller than --crop are skipped)")
    p.add_argument("--crop", type=int, default=256, help="crop side in pixels")
    p.add_argument("--keep-fp32", default="", help="comma-separated submodules (e.g. g_s, g_a.0) run in fp32 under autocast")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    return p.parse_args(argv)


def centre_crops(folder, n, side):
    """Up to n centre crops (n, 3, side, side) in [0, 1] from the photos of a folder, in name order."""
    crops = []
    for path in list_images(folder):
        rgb = read_rgb(path)
        h, w = rgb.shape[:2]
        if min(h, w) >= side:
            top, left = (h - side) // 2, (w - side) // 2
            crops.append(torch.from_numpy(rgb[top:top + side, left:left + side].copy()).permute(2, 0, 1))
        if len(crops) == n:
            break
    if not crops:
        sys.exit(f"error: {folder}: no photo of at least {side}×{side} pixels")
    return torch.stack(crops).float().div(255).contiguous(memory_format=torch.channels_last)


def keep_fp32(model, names):
    """Run the named submodules in fp32 even under autocast (their inputs cast up)."""
    for name in filter(None, names.split(",")):
        module, forward = model.get_submodule(name), model.get_submodule(name).forward

        def fp32_forward(*inputs, _forward=forward):
            with torch.autocast("cpu", enabled=False):
                return _forward(*(t.float() for t in inputs))
        module.forward = fp32_forward


def gradient(model, x, seeds, bf16):
    """(loss, flat gradient of each parameter) of one training pass with the seeds' noise and qualities."""
    quality, noise = model.draw_randomness(seeds, x.shape[-1])
    torch.manual_seed(0)  # the side latents' noise is drawn inside the pass: the same for all three
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
        loss = model.loss(x, model(x, quality, noise), quality)[0]
    loss.backward()
    return loss.item(), {n: p.grad.detach().double().flatten() for n, p in model.named_parameters() if p.grad is not None}


def main(argv=None):
    """Print, per part of the model, the gradient norm, the spread of a new draw and the bf16 error."""
    args = parse_args(argv)
    if not cpu_has_bf16():
        sys.exit("error: this CPU has no native bf16 (AVX-512 BF16 or AMX); autocast would be emulated")
    torch.set_num_threads(args.threads)
    model = load_checkpoint(args.weights)[0].train().to(memory_format=torch.channels_last)
    keep_fp32(model, args.keep_fp32)
    x = centre_crops(args.data, args.crops, args.crop)
    seeds = torch.arange(len(x))
    loss_a, a = gradient(model, x, seeds, False)
    _, b = gradient(model, x, seeds + len(x), False)
    loss_bf16, c = gradient(model, x, seeds, True)
    print(f"{len(x)} crops of {args.crop}², loss fp32 {loss_a:.5f}, bf16 {loss_bf16:.5f}")
    print(f"{'part':10s} {'|fp32 grad|':>12s} {'|A − B| new draw':>17s} {'|bf16 − A|':>11s}")
    for part in sorted({n.split(".")[0] for n in a}):
        names = [n for n in a if n.split(".")[0] == part]
        ga, gb, gc = (torch.cat([g[n] for n in names]) for g in (a, b, c))
        print(f"{part:10s} {ga.norm():12.4g} {(ga - gb).norm():17.4g} {(gc - ga).norm():11.4g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
