"""Compress and decompress images with a trained checkpoint.

  python test.py                                   # images/ → compressed_folder/*.qae → decompressed_folder/*.png
  python test.py compress IN.png OUT.qae [--quality Q] [--weights W]
  python test.py decompress IN.qae OUT.png         # the file says which model made it

Folder mode prints, per image, size, bytes, bpp (from the file size), PSNR and encode / decode
seconds (file I/O and entropy coding included), then the means.
"""
import argparse
import hashlib
import os
import sys
import time

import torch

import metrics
from checkpoint import load_checkpoint
from codec import CODERS, FormatError, compress_file, decompress_file, unpack
from encryption import ENV_VAR, decrypt, encrypt, is_encrypted, read_passphrase
from imagefiles import list_images, read_image
from runtime import keep_freed_memory, resolve_device

ROOT = os.path.dirname(os.path.abspath(__file__))  # shipped weights and sample images are found from here
DEFAULT_WEIGHTS = os.path.join(ROOT, "weights", "hyper.pt")


def parse_args(argv=None):
    """Folder mode flags plus the compress / decompress subcommands."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--weights", default=None,
                        help=f"checkpoint to use (default: {DEFAULT_WEIGHTS} to compress; to decompress, the "
                             "checkpoint in --weights-dir whose identity the file names)")
    common.add_argument("--weights-dir", default=os.path.join(ROOT, "weights"),
                        help="where to look for the checkpoint a file names")
    common.add_argument("--quality", type=float, default=None,
                        help="rd / hyper models: quality 1 (smallest) … 8 (best), fractions allowed; default: highest")
    common.add_argument("--coder", default="constriction", choices=CODERS, help="entropy coder written into new files")
    common.add_argument("--encrypt", action="store_true",
                        help="password-protect new files (AES-256-GCM, scrypt key); the passphrase comes from "
                             f"--key-file, else ${ENV_VAR}, else is asked for twice at the terminal")
    common.add_argument("--key-file", default=None,
                        help="file holding the passphrase (for --encrypt and for opening encrypted files)")
    common.add_argument("--device", default="cpu", help="cpu or cuda")
    common.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                parents=[common])
    p.add_argument("--images", default=os.path.join(ROOT, "images"), help="folder mode: folder of images to compress")
    p.add_argument("--compressed-dir", default="compressed_folder", help="folder mode: where NAME.qae files go")
    p.add_argument("--decompressed-dir", default="decompressed_folder", help="folder mode: where NAME.png files go")
    p.add_argument("--workers", type=int, default=1,
                   help="folder mode: processes compressing in parallel (each with one torch thread)")
    p.add_argument("--shard", default=None,
                   help="folder mode: i/n takes a deterministic share of the files (by name hash), so n machines "
                        "can split one collection with no coordination")
    p.add_argument("--results", default=None,
                   help="folder mode: write per-image results to this .json or .csv (merge shards with metrics.py --merge)")
    sub = p.add_subparsers(dest="command", metavar="{compress,decompress}")
    c = sub.add_parser("compress", parents=[common], help="compress one image file")
    c.add_argument("input", help="image file (PNG, JPEG, …)")
    c.add_argument("output", help="compressed file to write (.qae)")
    d = sub.add_parser("decompress", parents=[common], help="decompress one .qae file")
    d.add_argument("input", help="compressed file (.qae)")
    d.add_argument("output", help="image file to write (PNG unless the extension says otherwise)")
    return p.parse_args(argv)


def setup_device(args):
    """Apply --threads, check --device, and keep freed memory for reuse (faster coding)."""
    keep_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    resolve_device(args.device)


def load_model(path, device):
    """(model, 4-byte identity, checkpoint) from a checkpoint file, with a clear error when missing."""
    if not os.path.exists(path):
        raise ValueError(f"checkpoint {path} not found (train one with train.py or pass --weights)")
    model, ckpt = load_checkpoint(path, device)
    if not model.has_tables():
        raise ValueError(f"{path}: {model.cfg.kind} checkpoint without entropy tables (save it with train.py)")
    return model, bytes.fromhex(ckpt["model_id"]), ckpt


def find_weights(data, args):
    """The checkpoint that made a file: --weights if given, else the one in --weights-dir with its identity."""
    if args.weights:
        return args.weights
    header, _, _ = unpack(data)
    wanted = header["model_id"].hex()
    folder = args.weights_dir
    names = sorted(f for f in os.listdir(folder) if f.endswith(".pt")) if os.path.isdir(folder) else []
    for name in names:
        path = os.path.join(folder, name)
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:
            continue
        if isinstance(ckpt, dict) and ckpt.get("model_id") == wanted:
            return path
    raise FormatError(f"no checkpoint in {folder}/ has the identity {wanted} that made this file (pass --weights)")


def compress_timed(model, mid, src, dst, args, passphrase=None):
    """Compress one image file to dst atomically (encrypted if a passphrase is given); (bytes, seconds, notices)."""
    t = time.perf_counter()
    seal = (lambda data: encrypt(data, passphrase)) if passphrase else None
    data, notices = compress_file(model, mid, src, dst, args.quality, args.coder, seal)
    return data, time.perf_counter() - t, notices


def read_compressed(path, args, passphrase=None):
    """A compressed file's bytes, decrypted first when it is encrypted (asking for the passphrase if needed)."""
    with open(path, "rb") as f:
        data = f.read()
    if is_encrypted(data):
        data = decrypt(data, passphrase or read_passphrase(args.key_file))
    return data


def shard(paths, spec):
    """This machine's deterministic share "i/n" of a file list: the files whose name hashes to i mod n."""
    try:
        i, n = (int(v) for v in spec.split("/"))
    except ValueError:
        raise ValueError(f"--shard {spec!r}: expected i/n, e.g. 0/4") from None
    if not 0 <= i < n:
        raise ValueError(f"--shard {spec!r}: need 0 <= i < n")
    # A hash of the name (not the position) keeps a file's shard fixed when others are added.
    return [p for p in paths if int.from_bytes(hashlib.sha256(os.path.basename(p).encode()).digest()[:8], "big") % n == i]


WORKER = {}  # per-process state of a folder run: model, identity, args, passphrase


def init_worker(weights, args, passphrase, threads=0):
    """Load the model once per process (one torch thread per pool worker)."""
    if threads:
        torch.set_num_threads(threads)
    model, mid, ckpt = load_model(weights, args.device)
    WORKER.update(model=model, mid=mid, ckpt=ckpt, args=args, passphrase=passphrase)


def process_image(path):
    """Compress one image to the compressed folder and decompress it back: (row, notices) or (None, error)."""
    model, mid, args, passphrase = WORKER["model"], WORKER["mid"], WORKER["args"], WORKER["passphrase"]
    stem = os.path.splitext(os.path.basename(path))[0]
    qae = os.path.join(args.compressed_dir, stem + ".qae")
    png = os.path.join(args.decompressed_dir, stem + ".png")
    try:
        data, t_enc, notices = compress_timed(model, mid, path, qae, args, passphrase)
        t = time.perf_counter()
        rgb = decompress_file(model, mid, read_compressed(qae, args, passphrase), png)
        t_dec = time.perf_counter() - t
        original = read_image(path)[0]
    except (ValueError, OSError) as e:
        return {"image": stem}, str(e)
    h, w = original.shape[:2]
    row = {"image": stem, "width": w, "height": h, "bytes": len(data), "bpp": metrics.bpp(len(data), h, w),
           "psnr": metrics.psnr(original, rgb), "encode_s": t_enc, "decode_s": t_dec}
    return row, notices


def map_images(paths, args, weights, passphrase):
    """process_image over every path, in this process or a pool of --workers processes, in order."""
    if args.workers <= 1:
        init_worker(weights, args, passphrase)
        yield from map(process_image, paths)
        return
    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # fork after torch has started threads can deadlock
    with ctx.Pool(args.workers, init_worker, (weights, args, passphrase, 1)) as pool:
        yield from pool.imap(process_image, paths)


def run_folder(args):
    """Compress every image of a folder (or its --shard) and decompress it again, printing per-image figures."""
    paths = list_images(args.images) if os.path.isdir(args.images) else []
    if not paths:
        raise ValueError(f"no images in {args.images!r}")
    if args.shard:
        paths = shard(paths, args.shard)
        print(f"shard {args.shard}: {len(paths)} image(s)")
        if not paths:
            return 0
    weights = args.weights or DEFAULT_WEIGHTS
    model, mid, ckpt = load_model(weights, args.device)
    quality = model.quality_of(model.rate_param(args.quality))  # checked before any image is read
    print(f"model {weights} ({ckpt['kind']}, id {mid.hex()}, step {ckpt.get('step', '?')})"
          + (f", quality {quality:g}" if quality is not None else ""))
    passphrase = read_passphrase(args.key_file, confirm=True) if args.encrypt else None
    print(f"{'image':20s} {'size':>10s} {'bytes':>8s} {'bpp':>7s} {'PSNR':>7s} {'enc s':>6s} {'dec s':>6s}")
    rows, failed, t0 = [], [], time.perf_counter()
    for row, info in map_images(paths, args, weights, passphrase):
        if "bpp" not in row:
            failed.append(row["image"])
            print(f"{row['image']:20s} skipped: {info}", file=sys.stderr)
            continue
        for n in info:
            print(f"note: {n}", file=sys.stderr)
        rows.append(row)
        size = f"{row['width']}x{row['height']}"
        print(f"{row['image']:20s} {size:>10s} {row['bytes']:8d} {row['bpp']:7.3f} "
              f"{row['psnr']:7.2f} {row['encode_s']:6.2f} {row['decode_s']:6.2f}")
    if rows:
        m = metrics.mean_scores(rows)
        print(f"{'mean (' + str(len(rows)) + ')':20s} {'':>10s} {m['bytes']:8.0f} {m['bpp']:7.3f} {m['psnr']:7.2f} "
              f"{m['encode_s']:6.2f} {m['decode_s']:6.2f}")
        print(f"{len(rows) / (time.perf_counter() - t0):.2f} images/s with {max(args.workers, 1)} worker(s)")
    if args.results:
        metrics.write_results(args.results, rows)
    if failed:
        print(f"{len(failed)} of {len(paths)} images failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def main(argv=None):
    """Dispatch to folder mode or a subcommand; every failure is one line on stderr and exit code 1."""
    args = parse_args(argv)
    try:
        setup_device(args)
        if args.command == "compress":
            model, mid, _ = load_model(args.weights or DEFAULT_WEIGHTS, args.device)
            passphrase = read_passphrase(args.key_file, confirm=True) if args.encrypt else None
            data, seconds, notices = compress_timed(model, mid, args.input, args.output, args, passphrase)
            for n in notices:
                print(f"note: {n}", file=sys.stderr)
            print(f"{args.output}: {len(data)} bytes in {seconds:.2f} s")
            return 0
        if args.command == "decompress":
            t = time.perf_counter()
            data = read_compressed(args.input, args)
            model, mid, _ = load_model(find_weights(data, args), args.device)
            rgb = decompress_file(model, mid, data, args.output)
            seconds = time.perf_counter() - t
            print(f"{args.output}: {rgb.shape[1]}x{rgb.shape[0]} in {seconds:.2f} s")
            return 0
        return run_folder(args)
    except (FormatError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
