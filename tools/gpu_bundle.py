"""Pack a training burst for a CUDA machine that has nothing of ours: the code, the start checkpoint and the
training photos in one small folder, and the one command that trains from it.

  python tools/gpu_bundle.py --train-dir data/train --out gpu_bundle   # starts from the default weights (--init)
  sh gpu_bundle/burst.sh OUT                     # there: 9 minutes of training, results in OUT
  sh gpu_bundle/burst.sh OUT --session-minutes 4 --batch-size 16      # any train.py flag overrides the bundle's

The folder holds code.tar.gz (the library and train.py), start.pt (the --init checkpoint), photos.npz (as
many training photos as fit --max-mb, JPEG at their training size) and burst.sh. A burst leaves in OUT the
run's checkpoint (burst.pt, shippable; burst_best.pt, the best by validation; burst_ema.pt and
burst_ema_best.pt, the same of the weights' moving average), its logs and its resume
state (burst_resume.pt), each file larger than --part-mb in parts (NAME.partNN). Copy those parts into the
bundle folder and the next burst continues the run exactly (`cat burst_resume.pt.part* > burst_resume.pt` joins them anywhere).
"""
import argparse
import os
import random
import shlex
import shutil
import subprocess
import sys
import tarfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from checkpoint import DEFAULT_WEIGHTS  # noqa: E402
from dataset import pack_photos  # noqa: E402
from imagefiles import list_images  # noqa: E402
from runtime import HelpFormatter  # noqa: E402

# The burst's training flags: the default's joint fine-tune of docs/training.md, on a GPU in bf16. --max-minutes
# sets the learning-rate schedule over every burst of the campaign; --session-minutes stops each one.
BURST_FLAGS = ("--arch resctx --device cuda --amp bf16 --layout channels_last --batch-size 32 --crop 256 --lr 5e-5 "
               "--entropy-lr-scale 1 --warmup 100 --min-lr-ratio 0.1 --max-minutes 600 --session-minutes 9 "
               "--val-dir none --workers 6 --ckpt-minutes 3 --log-every 50 --ema 0.999")

BURST_SH = """#!/bin/sh
# A training burst from this folder alone (tools/gpu_bundle.py wrote it): sh burst.sh OUT [train.py flags ...]
set -e
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$1" && out=$(cd "$1" && pwd) && shift
work=$(mktemp -d)
tar xzf "$here/code.tar.gz" -C "$work"
mkdir -p "$work/run"
if [ -f "$here/burst_resume.pt" ]; then cp "$here/burst_resume.pt" "$work/run/"
elif [ -f "$here/burst_resume.pt.part00" ]; then cat "$here"/burst_resume.pt.part* > "$work/run/burst_resume.pt"; fi
cd "$work"
python train.py {flags} --init "$here/start.pt" --train-dir "$here/photos.npz" --out "$work/run" --name burst \\
    --resume "$@"
for f in burst.pt burst_best.pt burst_ema.pt burst_ema_best.pt burst_resume.pt burst_log.csv losses.txt; do
    [ -f "run/$f" ] || continue
    if [ "$(wc -c < "run/$f")" -gt {part_bytes} ]; then split -b {part_bytes} -d "run/$f" "$out/$f.part"
    else cp "run/$f" "$out/"; fi
done
ls -l "$out"
"""


def parse_args(argv=None):
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--init", default=DEFAULT_WEIGHTS, help="checkpoint the burst starts from")
    p.add_argument("--train-dir", default="data/train", help="folder of training photos (searched recursively)")
    p.add_argument("--out", default="gpu_bundle", help="folder to write (replaced if it exists)")
    p.add_argument("--max-mb", type=float, default=50,
                   help="MiB of the whole folder (the photos get what is left); 50 keeps it and the repository "
                        "without its weights under 64 MiB")
    p.add_argument("--flags", default=BURST_FLAGS, help="train.py flags of the burst (its --init, --train-dir, "
                                                       "--out and --name are the bundle's)")
    p.add_argument("--part-mb", type=float, default=15, help="files a burst leaves larger than this (MiB) "
                                                               "are split, for copies limited per file")
    p.add_argument("--seed", type=int, default=0, help="order in which photos are packed until the budget is used")
    return p.parse_args(argv)


def code_files():
    """The tracked files a training run needs: the library and scripts at the top, models/, requirements.txt."""
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    return [f for f in listed if f == "requirements.txt" or (f.endswith(".py") and ("/" not in f or f.startswith("models/")))]


def write_code(out):
    """code.tar.gz of code_files(); its size in bytes."""
    path = os.path.join(out, "code.tar.gz")
    with tarfile.open(path, "w:gz") as tar:
        for f in code_files():
            tar.add(os.path.join(ROOT, f), arcname=f)
    return os.path.getsize(path)


def main(argv=None):
    """Write the bundle folder; say what went in."""
    args = parse_args(argv)
    paths = list_images(args.train_dir) if os.path.isdir(args.train_dir) else []
    if not paths:
        sys.exit(f"error: no training photos in {args.train_dir!r}")
    shutil.rmtree(args.out, ignore_errors=True)
    os.makedirs(args.out)
    used = write_code(args.out)
    shutil.copyfile(args.init, os.path.join(args.out, "start.pt"))
    with open(os.path.join(args.out, "burst.sh"), "w") as f:
        f.write(BURST_SH.format(flags=" ".join(shlex.quote(a) for a in shlex.split(args.flags)), part_bytes=int(args.part_mb * 2**20)))
    used += os.path.getsize(args.init) + os.path.getsize(os.path.join(args.out, "burst.sh"))
    random.Random(args.seed).shuffle(paths)
    left = args.max_mb * 2**20 - used - 4096  # the .npz's own headers
    if left <= 0:
        sys.exit(f"error: --max-mb {args.max_mb:g} leaves no room for photos (code and checkpoint: {used / 2**20:.1f} MB)")
    n = pack_photos(paths, os.path.join(args.out, "photos.npz"), left)
    total = sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out))
    print(f"wrote {args.out}: {n} of {len(paths)} photos, {total / 2**20:.1f} MiB in all; "
          f"run there: sh {os.path.join(args.out, 'burst.sh')} OUT")
    return 0


if __name__ == "__main__":
    sys.exit(main())
