"""Compress a folder of photos on a Dask cluster with the Python API: one task per photo, each worker loading the
checkpoint once (a pickled qae.Codec travels as its path). A path for collections too large for one machine,
using an engine this project does not maintain.

  python tools/dask_compress.py --images DIR --out DIR                       # a local cluster, one worker per core
  python tools/dask_compress.py --images DIR --out DIR --scheduler tcp://HOST:8786 --quality 4

Every worker must see the checkpoint and the photos at the same paths (a shared file system, or the same
repository and data on every machine). Writes OUT/NAME.qae for each photo (subfolders mirrored) and prints the
bits over all pixels.
"""
import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from runtime import HelpFormatter, wait_passively  # noqa: E402

wait_passively()


def compress_one(codec, path, root, out, quality):
    """One task: a photo → OUT/…/NAME.qae, written atomically; (output path, bytes, pixels)."""
    import qae
    from imagefiles import atomic_write, output_name

    data = codec.compress(path, quality=quality)
    target = os.path.join(out, output_name(path, root) + ".qae")
    atomic_write(target, data)
    head = qae.info(data)
    return target, len(data), head["width"] * head["height"]


def run(images, out, quality=None, weights=None, scheduler=None, workers=None):
    """Compress every photo under `images` on the cluster; [(output path, bytes, pixels)] in file order."""
    from dask.distributed import Client, LocalCluster

    import qae
    from imagefiles import list_images

    paths = list_images(images)
    if not paths:
        raise ValueError(f"no images in {images!r}")
    codec = qae.Codec(weights)  # checked here once; the workers receive its path, not its weights
    cluster = None if scheduler else LocalCluster(n_workers=workers or os.cpu_count(), threads_per_worker=1,
                                                  processes=True, dashboard_address=None)
    try:
        with Client(scheduler or cluster) as client:
            remote = client.scatter(codec, broadcast=True)
            futures = client.map(compress_one, [remote] * len(paths), paths, root=images, out=out, quality=quality,
                                 pure=False)
            return client.gather(futures)
    finally:
        if cluster is not None:
            cluster.close()


def main(argv=None):
    """Parse the flags, run, print the totals."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--images", required=True, help="folder of photos (searched recursively)")
    p.add_argument("--out", required=True, help="folder for the .qae files")
    p.add_argument("--quality", type=float, default=None, help="1 … 8 (default: the model's highest)")
    p.add_argument("--weights", default=None, help="checkpoint (default: the shipped default model)")
    p.add_argument("--scheduler", default=None, help="address of a running Dask scheduler (default: a local cluster)")
    p.add_argument("--workers", type=int, default=None, help="local cluster: worker processes (default: one per core)")
    args = p.parse_args(argv)
    try:
        rows = run(args.images, args.out, args.quality, args.weights, args.scheduler, args.workers)
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    total, pixels = sum(r[1] for r in rows), sum(r[2] for r in rows)
    print(f"{len(rows)} photos: {total} bytes for {pixels:,} pixels = {8 * total / pixels:.3f} bpp, in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
