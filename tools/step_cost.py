"""CPU time of one training step (forward, backward, Adam) of several models, measured in one process with the
models taking turns, so a busy machine slows them alike and the ratios hold.

  python tools/step_cost.py ctx,spatial=64 ctx,spatial=64,N=128 resctx --threads 1
  python tools/step_cost.py ctx,spatial=64 --amp bf16     # against fp32: bf16 autocast of the transforms
  python tools/step_cost.py resctx --compile --layout channels_last   # against eager, as train.py trains resctx

A model is KIND[,FIELD=VALUE…]: a registered kind and the config fields that differ from its defaults.
"""
import argparse
import contextlib
import dataclasses
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from model import KINDS, build_model  # noqa: E402
from runtime import HelpFormatter  # noqa: E402


def parse_args(argv=None):
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("models", nargs="+", help="KIND[,FIELD=VALUE…] of each model to time")
    p.add_argument("--batch-size", type=int, default=8, help="crops per step")
    p.add_argument("--crop", type=int, default=256, help="crop side in pixels")
    p.add_argument("--steps", type=int, default=6, help="timed steps of each model (after two untimed)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--amp", choices=("off", "bf16"), default="off",
                   help="bf16: time each model in fp32 and under CPU bf16 autocast")
    p.add_argument("--layout", choices=("nchw", "channels_last"), default="nchw",
                   help="memory layout of the models and crops (train.py's auto: channels_last but for hyper)")
    p.add_argument("--compile", action="store_true",
                   help="time each model eager and torch.compiled (as train.py --compile; the compile is untimed)")
    return p.parse_args(argv)


def config_of(spec):
    """A config from KIND[,FIELD=VALUE…]; the values parsed as the field's default's type."""
    kind, *fields = spec.split(",")
    if kind not in KINDS:
        sys.exit(f"error: {spec}: unknown kind {kind!r} (known: {', '.join(KINDS)})")
    cfg = KINDS[kind][0]()
    changes = {}
    for field in fields:
        name, _, value = field.partition("=")
        if not hasattr(cfg, name):
            sys.exit(f"error: {spec}: {kind} has no config field {name!r}")
        default = getattr(cfg, name)
        changes[name] = tuple(int(v) for v in value.split("/")) if isinstance(default, tuple) else type(default)(value)
    return dataclasses.replace(cfg, **changes)


def step(model, net, opt, x, amp):
    """One training step of model through net (itself or its compiled form); its CPU seconds (this process)."""
    quality, noise = model.draw_randomness(torch.arange(len(x)), x.shape[-1])
    t = time.process_time()
    with torch.autocast("cpu", dtype=torch.bfloat16) if amp else contextlib.nullcontext():
        loss = model.loss(x, net(x, quality, noise), quality)[0]
    opt.zero_grad()
    loss.backward()
    opt.step()
    return time.process_time() - t


def main(argv=None):
    """Time every (model, precision) in turn and print CPU seconds a step and samples per CPU second."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    runs, layout = [], torch.channels_last if args.layout == "channels_last" else torch.contiguous_format
    for spec in args.models:
        model = build_model(config_of(spec)).train().to(memory_format=layout)
        opt = torch.optim.Adam(model.parameters(), 1e-5)
        for amp in (False, True) if args.amp == "bf16" else (False,):
            for net in (model, torch.compile(model)) if args.compile else (model,):
                name = spec + (" bf16" if amp else "") + (" compiled" if net is not model else "")
                runs.append((name, model, net, opt, amp, []))
    x = torch.rand(args.batch_size, 3, args.crop, args.crop).contiguous(memory_format=layout)
    for i in range(args.steps + 2):  # the first two untimed: the compile and its guards' second pass
        for _, model, net, opt, amp, times in runs:
            seconds = step(model, net, opt, x, amp)
            if i > 1:
                times.append(seconds)
    base = statistics.median(runs[0][5])
    print(f"{args.batch_size} crops of {args.crop}², {args.threads} thread(s), median of {args.steps} steps:")
    for name, _, _, _, _, times in runs:
        t = statistics.median(times)
        print(f"  {name:40s} {t:6.2f} CPU-s a step  {args.batch_size / t:5.2f} samples per CPU-s  ×{t / base:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
