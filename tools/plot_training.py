"""Plot a training run over wall-clock time: loss, bpp and PSNR (train log) plus validation (losses.txt).

  python tools/plot_training.py runs/rd/rd_log.csv --losses runs/rd/losses.txt --out results/training_rd.png
  python tools/plot_training.py a/rd_log.csv b/rd_log.csv --losses a/losses.txt b/losses.txt   # b continued a (--init)
"""
import argparse
import csv
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from runtime import HelpFormatter  # noqa: E402


def parse_args(argv=None):
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("log", nargs="+", help="the run's NAME_log.csv written by train.py; several = phases "
                                          "of one run (each started with --init from the last), drawn end to end")
    p.add_argument("--losses", nargs="*", default=[], help="losses.txt of each phase, in the same order "
                                                          "(adds validation points per epoch)")
    p.add_argument("--name", default=None, help="run name in losses.txt and the title (default: from the first log's file name)")
    p.add_argument("--machine", default="2-core CPU", help="what the wall-clock minutes were measured on (x-axis label)")
    p.add_argument("--out", default="training.png", help="PNG to write")
    return p.parse_args(argv)


def read_log(path):
    """Rows of a train.py log CSV as dicts of floats."""
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]


def read_validation(path, name):
    """(step, val PSNR, val bpp or None) per epoch of run `name` from losses.txt."""
    points = []
    with open(path) as f:
        for line in f:
            m = re.match(rf"{re.escape(name)} epoch \d+ step (\d+) .*? val_psnr ([\d.]+)(?: val_bpp ([\d.]+))?", line)
            if m:
                points.append((int(m[1]), float(m[2]), float(m[3]) if m[3] else None))
    return points


def chain(logs, losses, name):
    """Log rows and validation points of consecutive phases, steps and minutes continued end to end."""
    rows, val, bounds = [], [], []
    for i, path in enumerate(logs):
        step0, min0 = (rows[-1]["step"], rows[-1]["minutes"]) if rows else (0, 0)
        part = read_log(path)
        if i:
            bounds.append(min0)
        rows += [{**r, "step": r["step"] + step0, "minutes": r["minutes"] + min0} for r in part]
        if i < len(losses):
            val += [(s + step0, p, b) for s, p, b in read_validation(losses[i], name)]
    return rows, val, bounds


def main(argv=None):
    """Draw the three panels and save the PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    args = parse_args(argv)
    name = args.name or os.path.basename(args.log[0]).removesuffix("_log.csv")
    rows, val, bounds = chain(args.log, args.losses, name)
    if not rows:
        sys.exit(f"error: {', '.join(args.log)} has no logged steps yet")
    steps, minutes = [r["step"] for r in rows], [r["minutes"] for r in rows]
    has_bpp = any(r["bpp"] for r in rows)
    fig, axes = plt.subplots(1, 3 if has_bpp else 2, figsize=(14 if has_bpp else 10, 4))
    panels = [("loss", "training loss (mean per log line)"), ("psnr", "PSNR (dB)")] + ([("bpp", "bpp")] if has_bpp else [])
    for ax, (key, label) in zip(axes, panels):
        ax.plot([r["minutes"] for r in rows], [r[key] for r in rows], lw=0.8, label="train (noisy latents)")
        idx = {"psnr": 1, "bpp": 2}.get(key)
        pts = [(float(np.interp(v[0], steps, minutes)), v[idx]) for v in val if idx and v[idx] is not None]
        if pts:
            ax.plot(*zip(*pts), "o-", ms=3, label="validation (rounded latents)")
        for b in bounds:
            ax.axvline(b, color="grey", ls=":", lw=1)
        ax.set_xlabel(f"wall-clock minutes ({args.machine})" + ("; dotted: next phase (--init)" if bounds else ""))
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_yscale("log")
    fig.suptitle(f"{name}: {int(rows[-1]['step'])} steps in {rows[-1]['minutes']:.0f} min")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
