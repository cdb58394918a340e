"""Store a checkpoint's weights at another precision: a smaller file of a slightly different model.

  python tools/store_precision.py weights/resctx.pt runs/resctx-fp16.pt --precision fp16

The weights are rounded as checkpoint.pack_state stores them (fp16, or int8 with an fp16 scale per
output channel for the large weights) and the entropy tables are rebuilt from the rounded weights, as
train.py does for the checkpoints it ships (checkpoint.save_coding_checkpoint). The result is another
model (its own identity): files made with the source do not decode with it, so compare the two with
benchmark.py before using it. The source keeps its history; the new file records where it came from.
"""
import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from checkpoint import load_checkpoint, save_coding_checkpoint  # noqa: E402
from runtime import HelpFormatter  # noqa: E402

OWN = ("kind", "config", "model", "model_id", "precision")  # what save_checkpoint writes anew


def main(argv=None):
    """Round, rebuild the tables, write atomically; print the two sizes."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("src", help="checkpoint to read")
    p.add_argument("dst", help="checkpoint to write (never the source)")
    p.add_argument("--precision", default="fp16", choices=("fp32", "fp16", "int8"), help="how to store the weights")
    args = p.parse_args(argv)
    if os.path.abspath(args.src) == os.path.abspath(args.dst):
        sys.exit("error: the output would replace the source (files made with it would no longer find it)")
    try:
        model, ckpt = load_checkpoint(args.src)
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    extra = {k: v for k, v in ckpt.items() if k not in OWN}
    extra["notes"] = (str(ckpt.get("notes") or "") + f" Weights stored in {args.precision} from {os.path.basename(args.src)} "
                      f"(identity {ckpt['model_id']}) by tools/store_precision.py.").strip()
    save_coding_checkpoint(args.dst, model, args.precision, **extra)
    new = load_checkpoint(args.dst)[1]
    print(f"{args.dst}: {args.precision}, identity {new['model_id']}, {os.path.getsize(args.dst) / 1e6:.1f} MB "
          f"(source {os.path.getsize(args.src) / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
