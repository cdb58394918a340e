"""Compare training runs by validation loss against CPU time: which design gains most per CPU-minute.

  python tools/plot_trials.py runs/a/losses.txt:"N = 80" runs/b/losses.txt:"N = 128" --start 1.22905 --out trials.png
  python tools/plot_trials.py runs/b/losses.txt:b --step-seconds b=5.3      # a run logged before the CPU clock

Each run is a train.py losses.txt (one validation line per epoch), optionally :LABEL. The x-axis is the run's
logged CPU-minutes (process CPU time, all threads), or, with --step-seconds LABEL=S, steps × S CPU-seconds
(e.g. measured with tools/step_cost.py). --start draws the shared starting point at 0 minutes. A run trained with
--ema gets a dashed second line: the validation of its weight average (ema_val_loss).
"""
import argparse
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from runtime import HelpFormatter  # noqa: E402

LINE = re.compile(r"\S+ epoch \d+ step (\d+) .*?val_loss ([\d.]+)(?:.*?cpu_minutes ([\d.]+))?")
AVERAGE = re.compile(r" ema_val_loss ([\d.]+)")


def parse_args(argv=None):
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("runs", nargs="+", help="losses.txt of each run, optionally followed by :LABEL")
    p.add_argument("--step-seconds", nargs="*", default=[], metavar="LABEL=S",
                   help="CPU-seconds a step of the run LABEL, for runs whose losses.txt has no cpu_minutes")
    p.add_argument("--start", type=float, default=None, help="validation loss every run starts from (drawn at 0)")
    p.add_argument("--machine", default="one core of a 2-core x86-64 CPU", help="what the CPU time was measured on")
    p.add_argument("--out", default="trials.png", help="PNG to write")
    return p.parse_args(argv)


def read_run(path, seconds=None):
    """[(CPU-minutes, validation loss)] of a losses.txt, from its cpu_minutes or from steps × seconds, and the same
    of its weight average (--ema) where the line has one."""
    points, averaged = [], []
    with open(path) as f:
        for line in f:
            m = LINE.match(line)
            if not m:
                continue
            if seconds is None and m[3] is None:
                sys.exit(f"error: {path} has no cpu_minutes: give --step-seconds for it")
            points.append((int(m[1]) * seconds / 60 if seconds is not None else float(m[3]), float(m[2])))
            average = AVERAGE.search(line)
            if average:
                averaged.append((points[-1][0], float(average[1])))
    return points, averaged


def main(argv=None):
    """Read every run, print its points, draw the PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    args = parse_args(argv)
    seconds = dict(s.split("=", 1) for s in args.step_seconds)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for spec in args.runs:
        path, _, label = spec.partition(":")
        label = label or os.path.basename(os.path.dirname(os.path.abspath(path)))
        points, averaged = read_run(path, float(seconds[label]) if label in seconds else None)
        if args.start is not None:
            points = [(0.0, args.start)] + points
        print(label + ": " + ", ".join(f"{t:.0f} min {v:.5f}" for t, v in points))
        line, = ax.plot(*zip(*points), "o-", ms=3, label=label)
        if averaged:
            print(label + ", weight average: " + ", ".join(f"{t:.0f} min {v:.5f}" for t, v in averaged))
            ax.plot(*zip(*averaged), "--", color=line.get_color(), label=f"{label}, weight average (--ema)")
    if args.start is not None:
        ax.axhline(args.start, color="grey", ls=":", lw=1, label="start")
    ax.set_xlabel(f"CPU-minutes ({args.machine})")
    ax.set_ylabel("validation loss (λ·255²·MSE + bpp, 3 qualities)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
