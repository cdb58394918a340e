"""Compress and decompress images with a trained checkpoint.

  python test.py                                   # images/ → compressed_folder/*.qae → decompressed_folder/*.png
  python test.py compress IN.png OUT.qae [--quality Q] [--weights W]
  python test.py decompress IN.qae OUT.png         # the file says which model made it
  python test.py info IN.qae                       # the header, without decoding
  cat IN.png | python test.py compress - - > OUT.qae   # "-" is standard input / output

Folder mode prints, per image, size, bytes, bpp (from the file size), PSNR and encode / decode
seconds (file I/O and entropy coding included), then the means and the bits over all pixels.
"""
import argparse
import contextlib
import hashlib
import io
import os
import signal
import sys
import time

from encryption import ENV_VAR
from runtime import HelpFormatter, wait_passively

wait_passively()  # before torch loads OpenMP

ROOT = os.path.dirname(os.path.abspath(__file__))  # shipped weights and sample images are found from here
WEIGHTS_DIR = os.path.join(ROOT, "weights")
DEFAULT_WEIGHTS = os.path.join(WEIGHTS_DIR, "resctx4.pt")
DEFAULT_EFFORT = 1  # effort.DEFAULT (not imported here: it would import torch before --help answers)


def model_options(weights_help):
    """Options of every command that loads a model."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--weights", default=None, help=weights_help)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--key-file", default=None, help="file holding the passphrase (for --encrypt and for opening "
                                                    f"encrypted files; else ${ENV_VAR}, else asked at the terminal)")
    return p


def encode_options():
    """Options of the commands that write .qae files."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--quality", type=float, default=None,
                   help="rd / hyper / ctx models: 1 (smallest) … 8 (best), fractions allowed; default: the highest")
    p.add_argument("--coder", default="constriction", help="entropy coder: constriction or arithmetic-compressor")
    p.add_argument("--effort", type=int, default=DEFAULT_EFFORT,
                   help="encoder effort 0 … 9: higher searches longer for smaller files at the same quality "
                        "(the decoder is the same); see the README for what each level costs and saves")
    p.add_argument("--encrypt", action="store_true", help="password-protect new files (AES-256-GCM, scrypt key)")
    return p


def decode_options():
    """Options of the commands that read .qae files."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--weights-dir", default=WEIGHTS_DIR, help="where to look for the checkpoint a file names")
    return p


def parse_args(argv=None):
    """Folder mode flags plus the compress / decompress / info subcommands (nothing heavy is imported here)."""
    encoding = model_options(f"checkpoint to compress with (default: {DEFAULT_WEIGHTS})")
    decoding = model_options("checkpoint to decompress with (default: the one in --weights-dir that made the file)")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter,
                                parents=[encoding, encode_options(), decode_options()])
    p.add_argument("--images", default=os.path.join(ROOT, "images"), help="folder of images to compress")
    p.add_argument("--compressed-dir", default="compressed_folder", help="where NAME.qae files go")
    p.add_argument("--decompressed-dir", default="decompressed_folder", help="where NAME.png files go")
    p.add_argument("--workers", type=int, default=1, help="processes compressing in parallel (one torch thread each)")
    p.add_argument("--shard", default=None,
                   help="i/n, i from 0 to n − 1: a deterministic share of the files (by name hash), so n machines "
                        "can split one collection with no coordination")
    p.add_argument("--results", default=None, help="write per-image results to this .json or .csv "
                                                   "(merge shards with metrics.py --merge)")
    sub = p.add_subparsers(dest="command", metavar="{compress,decompress,info}")
    c = sub.add_parser("compress", parents=[encoding, encode_options()], formatter_class=HelpFormatter,
                       help="compress one image file", description="Compress one image file into a .qae file.")
    c.add_argument("input", help="image file (PNG, JPEG, …), or - for standard input")
    c.add_argument("output", help="compressed file to write (.qae), or - for standard output")
    d = sub.add_parser("decompress", parents=[decoding, decode_options()], formatter_class=HelpFormatter,
                       help="decompress one .qae file", description="Decompress one .qae file into an image file.")
    d.add_argument("input", help="compressed file (.qae), or - for standard input")
    d.add_argument("output", help="image file to write (format from the extension), or - for PNG on standard output")
    d.add_argument("--allow-lossy", action="store_true",
                   help="allow an output format that does not keep every pixel: lossy (JPEG, WebP, …), palette (GIF) "
                        "or size-capped (ICO)")
    i = sub.add_parser("info", formatter_class=HelpFormatter, help="print a .qae file's header without decoding",
                       description="Print a .qae file's header (model, size, mode, rate, coder, bytes, bpp).")
    i.add_argument("input", help="compressed file (.qae), or - for standard input")
    args = p.parse_args(argv)
    early = options_before(sys.argv[1:] if argv is None else argv, args.command, p)
    if early:
        # argparse would let the subcommand's own defaults silently replace them.
        p.error(f"{', '.join(early)} must come after '{args.command}' (python test.py {args.command} [options] …)")
    return args


def options_before(argv, command, parser):
    """The options written before the subcommand (none in folder mode)."""
    if not command:
        return []
    takes_value = {s for a in parser._actions if a.option_strings and a.nargs != 0 for s in a.option_strings}
    early, i = [], 0
    while i < len(argv) and argv[i] != command:
        option = argv[i].split("=")[0]
        if option.startswith("-") and option != "-":
            early.append(option)
            i += option in takes_value and "=" not in argv[i]  # skip its value
        i += 1
    return early


def refuse_overwriting_input(src, dst):
    """ValueError when an output path names the input file (the same path or a link to it; "-" never does)."""
    try:
        same = "-" not in (src, dst) and os.path.exists(dst) and os.path.samefile(src, dst)
    except OSError:
        same = False
    if same:
        raise ValueError(f"{dst} is the input file: choose another output name")


def setup_device(args):
    """Apply --threads and check --device."""
    import torch

    from runtime import resolve_device

    if args.threads:
        torch.set_num_threads(args.threads)
    resolve_device(args.device)


def manage_memory(pixels):
    """Keep freed memory for reuse (faster coding) for images of at most one coding tile; for larger ones leave
    glibc's default and return True: the caller then hands freed memory back after each tile. Measured on a
    2-core x86-64 CPU with ctx at quality 4, one thread: Kodak images code 14–18 % faster kept; a 4000×3000
    image codes in 15 s at a 1.9 GB peak kept, 21 s at 1.35 GB by default, 22–24 s at 1.15 GB trimmed after
    each tile (what is kept fragments across the tiles' activations)."""
    import codec
    from runtime import keep_freed_memory

    if pixels <= codec.TILE**2:
        keep_freed_memory()
        return False
    return True


def load_model(path, device):
    """(model, 4-byte identity, checkpoint) from a checkpoint file, with a clear error when missing."""
    from checkpoint import load_checkpoint

    if not os.path.exists(path):
        raise ValueError(f"checkpoint {path} not found (train one with train.py or pass --weights)")
    model, ckpt = load_checkpoint(path, device)
    if not model.has_tables():
        raise ValueError(f"{path}: {model.cfg.kind} checkpoint without entropy tables (save it with train.py)")
    return model, bytes.fromhex(ckpt["model_id"]), ckpt


def find_weights(data, args):
    """The checkpoint that made a file: --weights if given, else the one in --weights-dir with its identity."""
    from checkpoint import find_checkpoint
    from codec import FormatError, unpack

    if args.weights:
        return args.weights
    try:
        return find_checkpoint(unpack(data)[0]["model_id"].hex(), args.weights_dir)
    except LookupError as e:
        raise FormatError(str(e)) from None


def compress_timed(model, mid, src, dst, args, passphrase=None, show=False, trim=False):
    """Compress one image file to dst atomically (encrypted if a passphrase is given), with a progress bar if
    show and freed memory handed back after each tile if trim; (bytes, seconds, notices)."""
    from codec import compress_file
    from encryption import encrypt

    t = time.perf_counter()
    seal = (lambda data: encrypt(data, passphrase)) if passphrase else None
    with progress_bar("compress", show, trim) as progress:
        data, notices = compress_file(model, mid, src, dst, args.quality, args.coder, seal, args.effort, progress)
    return data, time.perf_counter() - t, notices


@contextlib.contextmanager
def progress_bar(desc, show, trim=False):
    """progress(done, total) drawing a bar on standard error once the work has taken a second (large images, the
    encoder search), or None; with trim, each step (a tile, a strip) also hands freed memory back."""
    if not (show or trim):
        yield None
        return
    from tqdm import tqdm

    from runtime import hand_back_freed_memory

    bars = []

    def progress(done, total):
        if trim:
            hand_back_freed_memory()
        if not show:
            return
        if not bars:  # opened at the first report: work refused before it leaves no empty bar
            bars.append(tqdm(desc=desc, total=total, delay=1.0, leave=False, file=sys.stderr,
                             bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining}"))
        bars[0].update(done - bars[0].n)

    try:
        yield progress
    finally:
        for bar in bars:
            bar.close()


def read_input(path):
    """The bytes of a file, or of standard input for "-"."""
    if path == "-":
        return sys.stdin.buffer.read()
    with open(path, "rb") as f:
        return f.read()


def read_qae(path):
    """A compressed file's bytes ("-": standard input), refused from its first bytes when it is not one."""
    from fileformat import file_bytes

    return file_bytes(sys.stdin.buffer if path == "-" else path)


def image_pixels(src):
    """The pixel count an image file declares (its header only; 0 when unreadable: reading it reports why)."""
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():  # a size warning, if any, comes when the image is read
            warnings.simplefilter("ignore")
            with Image.open(src) as im:
                return im.width * im.height
    except Image.DecompressionBombError:  # past Pillow's limit: larger than any tile (libvips may stream it)
        return 1 << 62
    except Exception:  # any reader error: read_image gives the one-line message later
        return 0
    finally:
        if hasattr(src, "seek"):
            src.seek(0)


def qae_size(data):
    """(width, height) a .qae file declares ((0, 0) when it is not readable: decoding reports why)."""
    from fileformat import FormatError, unpack

    try:
        header = unpack(data)[0]
    except FormatError:
        return 0, 0
    return header["width"], header["height"]


def read_compressed(path, args, passphrase=None):
    """A compressed file's bytes, decrypted first when it is encrypted (asking for the passphrase if needed)."""
    from encryption import decrypt, is_encrypted, read_passphrase

    data = read_qae(path)
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
    import torch

    if threads:
        torch.set_num_threads(threads)
    model, mid, ckpt = load_model(weights, args.device)
    WORKER.update(model=model, mid=mid, ckpt=ckpt, args=args, passphrase=passphrase)


def check_distinct_outputs(paths, root):
    """ValueError naming two inputs that would write the same outputs (a.png and a.jpg in one folder)."""
    from imagefiles import output_name

    seen = {}
    for path in paths:
        other = seen.setdefault(os.path.normcase(output_name(path, root)), path)
        if other != path:
            raise ValueError(f"{other} and {path} would both be written as {output_name(path, root)}.qae / .png: "
                             f"rename one, or move it to its own folder")


def process_image(path):
    """Compress one image to the compressed folder and decompress it back: (row, notices) or (None, error)."""
    import metrics
    from codec import decompress_file
    from imagefiles import output_name, read_image

    model, mid, args, passphrase = WORKER["model"], WORKER["mid"], WORKER["args"], WORKER["passphrase"]
    stem = output_name(path, args.images)
    qae = os.path.join(args.compressed_dir, stem + ".qae")
    png = os.path.join(args.decompressed_dir, stem + ".png")
    try:
        data, t_enc, notices = compress_timed(model, mid, path, qae, args, passphrase)
        t = time.perf_counter()
        rgb = decompress_file(model, mid, read_compressed(qae, args, passphrase), png)
        t_dec = time.perf_counter() - t
        rgb = read_image(png)[0] if rgb is None else rgb  # a large image went out in strips
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


def print_summary(rows, seconds, workers):
    """Means over the images, and the bits over all pixels of the folder (one tiny image cannot dominate it)."""
    import metrics

    m = metrics.mean_scores(rows)
    print(f"{'mean (' + str(len(rows)) + ')':20s} {'':>10s} {m['bytes']:8.0f} {m['bpp']:7.3f} {m['psnr']:7.2f} "
          f"{m['encode_s']:6.2f} {m['decode_s']:6.2f}")
    pixels, total = sum(r["width"] * r["height"] for r in rows), sum(r["bytes"] for r in rows)
    print(f"all {len(rows)} image{'s' * (len(rows) != 1)}: {total} bytes for {pixels:,} pixels = "
          f"{8 * total / pixels:.3f} bpp; {len(rows) / seconds:.2f} images/s with {max(workers, 1)} worker(s)")


def run_folder(args):
    """Compress every image of a folder (or its --shard) and decompress it again, printing per-image figures."""
    import metrics
    from encryption import read_passphrase
    from imagefiles import list_images

    paths = list_images(args.images) if os.path.isdir(args.images) else []
    if not paths:
        raise ValueError(f"no images in {args.images!r}")
    check_distinct_outputs(paths, args.images)
    if args.shard:
        paths = shard(paths, args.shard)
        print(f"shard {args.shard}: {len(paths)} image(s)")
        if not paths:
            if args.results:  # an empty share still leaves its file, so merging every shard's file works
                metrics.write_results(args.results, [])
            return 0
    weights = args.weights or DEFAULT_WEIGHTS
    manage_memory(max(map(image_pixels, paths)))
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
        print_summary(rows, time.perf_counter() - t0, args.workers)
    if args.results:
        metrics.write_results(args.results, rows)
    if failed:
        print(f"{len(failed)} of {len(paths)} images failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def check_output(path, allow_lossy):
    """A decompress output must be an image format Pillow writes, and lossless unless allowed."""
    from imagefiles import LOSSLESS_FORMATS, image_format

    if path == "-":
        return
    fmt = image_format(path)
    if fmt is None:
        raise ValueError(f"{path}: not an image file name (use .png, .tif, .bmp, … or - for PNG on standard output)")
    if fmt not in LOSSLESS_FORMATS and not allow_lossy:
        raise ValueError(f"{path}: {fmt} would not keep every pixel (lossy, fewer colours or a capped size); "
                         f"write PNG, TIFF or BMP, or pass --allow-lossy")


def compress_command(args):
    """test.py compress: one image file (or standard input) → one .qae file (or standard output)."""
    from encryption import read_passphrase

    refuse_overwriting_input(args.input, args.output)
    if args.output != "-" and not args.output.lower().endswith(".qae"):
        print(f"warning: {args.output} does not end in .qae", file=sys.stderr)
    model, mid, _ = load_model(args.weights or DEFAULT_WEIGHTS, args.device)
    passphrase = read_passphrase(args.key_file, confirm=True) if args.encrypt else None
    src = io.BytesIO(read_input("-")) if args.input == "-" else args.input
    trim = manage_memory(image_pixels(src))
    data, seconds, notices = compress_timed(model, mid, src, args.output, args, passphrase, show=True, trim=trim)
    for n in notices:
        print(f"note: {n}", file=sys.stderr)
    print(f"{args.output}: {len(data)} bytes in {seconds:.2f} s", file=sys.stderr if args.output == "-" else sys.stdout)
    return 0


def decompress_command(args):
    """test.py decompress: one .qae file (or standard input) → one image file (or PNG on standard output)."""
    from codec import decompress_file

    refuse_overwriting_input(args.input, args.output)
    t = time.perf_counter()
    data = read_compressed(args.input, args)
    w, h = qae_size(data)
    trim = manage_memory(w * h)
    model, mid, _ = load_model(find_weights(data, args), args.device)
    with progress_bar("decompress", True, trim) as progress:
        decompress_file(model, mid, data, args.output, progress)
    print(f"{args.output}: {w}x{h} in {time.perf_counter() - t:.2f} s",
          file=sys.stderr if args.output == "-" else sys.stdout)
    return 0


def info_command(args):
    """test.py info: a .qae file's header, one field a line."""
    from fileformat import header_info  # not qae: reading a header needs no PyTorch

    for key, value in header_info(read_qae(args.input)).items():
        print(f"{key:14s} {value:.4f}" if isinstance(value, float) else f"{key:14s} {value}")
    return 0


def main(argv=None):
    """Dispatch to folder mode or a subcommand; every failure is one line on stderr and exit code 1."""
    args = parse_args(argv)
    # SIGTERM (kill, a service stopping) unwinds like Ctrl-C, so no temporary file is left beside an output.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    commands = {"compress": compress_command, "decompress": decompress_command, "info": info_command}
    try:
        if args.command == "decompress":
            check_output(args.output, args.allow_lossy)  # before torch loads: a refusal is instant
        if args.command != "info":
            setup_device(args)
        code = commands.get(args.command, run_folder)(args)
        sys.stdout.flush()  # here, where a closed pipe is caught, not at exit
        return code
    except BrokenPipeError:  # `… | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 0
    except (ValueError, OSError) as e:  # FormatError and DecryptionError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
