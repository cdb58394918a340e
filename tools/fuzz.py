"""Coverage-guided fuzzing (atheris, libFuzzer's engine) of everything that reads untrusted bytes.

Targets and their contract (anything else is a crash: another exception, a hang past -timeout, or
memory past -rss_limit_mb):

  decode     .qae file → decompress with the shipped rd / hyper / seed weights or a small seeded ctx
             model (by the file's kind byte), every coder and format version: an image of the declared
             size or FormatError; and a current-version ANS payload that decodes is exactly the one the
             encoder writes for the decoded latents (a damaged payload never decodes to a picture). The harness writes the loaded model's identity and a fresh CRC into
             every input, so mutations reach the payload decoders; declared sizes are capped at
             FUZZ_PIXELS (decoding needs memory in proportion to the declared size).
  container  encrypted container → encryption.decrypt: bytes or DecryptionError.
  images     image file bytes (PNG / JPEG / TIFF / GIF / WebP / BMP …) → imagefiles.read_image: arrays of
             the image's size or ValueError.

  python tools/fuzz.py decode -max_total_time=60   # seeds: tests/fuzz/corpus/decode; new inputs: a temp folder
  python tools/fuzz.py images -runs=100000 -timeout=10
  python tools/fuzz.py --make-corpus                          # (re)write the seed corpora
  python tools/fuzz.py --replay decode tests/fuzz/crashes/decode-*   # one input after another, no fuzzing

Arguments after the target go to libFuzzer (-max_total_time, -runs, -timeout, -rss_limit_mb, …); the
target's corpus folder and tests/fuzz/qae.dict are added unless given.
"""
import importlib
import io
import os
import struct
import sys
import tempfile
import warnings
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

FUZZ_DIR = os.path.join(ROOT, "tests", "fuzz")
TARGETS = ("decode", "container", "images")
FUZZ_PIXELS = 1 << 20  # declared sizes above this are refused before decoding (like libjpeg-turbo's fuzzers)
PASSPHRASE = "fuzz"
DEFAULT_FLAGS = ["-timeout=30", "-rss_limit_mb=4096", "-max_len=65536"]
TRIM_MB = 2048  # above this resident size, freed memory goes back to the OS after an input (see trimmed)


def import_targets(instrument):
    """Import the modules under test, with atheris' coverage instrumentation when fuzzing."""
    names = ("codec", "encryption", "imagefiles")
    if instrument:
        import atheris

        with atheris.instrument_imports(include=["codec", "quantize", "model", "encryption", "imagefiles", "PIL"]):
            for name in names + ("model", "quantize", "PIL.Image"):
                importlib.import_module(name)
    return tuple(importlib.import_module(name) for name in names)


def ctx_model():
    """A small context model with a checkerboard, seeded, with random context networks (no shipped weights needed)."""
    import torch
    from model import CtxConfig, build_model

    torch.manual_seed(0)
    m = build_model(CtxConfig(N=16, M=24, H=8, slices=(4, 8, 12), context=16, spatial=8)).eval()
    for net in [*m.context, *m.spatial]:
        torch.nn.init.normal_(net[-1].weight, 0, 0.1)
    m.build_tables()
    return m


def decode_models():
    """{kind byte: (model, model id)} of every model kind, loaded once."""
    from checkpoint import load_checkpoint, model_id
    from codec import KINDS

    models = {}
    for kind, name in (("rd", "rd.pt"), ("hyper", "hyper.pt"), ("seed", "seed_resnet101.pt")):
        m, ckpt = load_checkpoint(os.path.join(ROOT, "weights", name))
        models[KINDS.index(kind)] = (m.eval(), bytes.fromhex(ckpt["model_id"]))
    m = ctx_model()
    models[KINDS.index("ctx")] = (m, model_id(m.state_dict()))
    return models


def decode_target(codec):
    """The decode target's one-input function."""
    models = decode_models()

    def one(data):
        """Decode one input with the model of its kind byte; the contract of the module docstring."""
        if len(data) >= codec.HEADER_BYTES and data[:3] == codec.MAGIC:
            m, mid = models.get(data[4], models[1])
            data = data[:6] + mid + data[10:-4]
            data += struct.pack(">I", zlib.crc32(data))
        else:
            m, mid = models[1]
        try:
            rgb, mode, alpha = codec.decompress(m, mid, data, max_pixels=FUZZ_PIXELS)
        except codec.FormatError:
            return
        header, payload, _ = codec.unpack(data)
        assert rgb.shape == (header["height"], header["width"], 3) and mode == header["mode"]
        assert alpha is None or alpha.shape == rgb.shape[:2]
        if header["coder"] == "constriction":  # ANS, format versions 4 and 5
            # A damaged payload that decodes is a garbage picture: what decodes must be exactly what the
            # encoder writes for those latents (ANS ends where its symbols end, so the stream is canonical).
            assert codec.canonical_payload(m, mid, data, max_pixels=FUZZ_PIXELS) == payload, "non-canonical payload"

    return one


def container_target(encryption):
    """The container target's one-input function."""

    def one(data):
        """Decrypt one input; bytes or DecryptionError."""
        try:
            assert isinstance(encryption.decrypt(data, PASSPHRASE), bytes)
        except encryption.DecryptionError:
            pass

    return one


def images_target(imagefiles):
    """The images target's one-input function."""

    def one(data):
        """Read one input as an image file; arrays of one size or ValueError."""
        try:
            rgb, mode, alpha, _ = imagefiles.read_image(io.BytesIO(data))
        except ValueError:
            return
        assert rgb.ndim == 3 and rgb.shape[2] == 3 and rgb.dtype.name == "uint8" and mode in imagefiles.MODES
        assert alpha is None or alpha.shape == rgb.shape[:2]

    return one


def trimmed(one):
    """one, followed by glibc's malloc_trim once the process holds more than TRIM_MB.

    libFuzzer's -rss_limit_mb reads the process's resident size, and glibc keeps freed memory: a 32-minute
    decode run stopped at 4.1 GB although the input it blamed peaks at 1.3 GB decoded alone. Trimming
    makes the limit measure what inputs need, not what the allocator kept."""
    import ctypes

    try:
        malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        page = os.sysconf("SC_PAGE_SIZE")
    except (OSError, AttributeError, ValueError):
        return one  # not glibc: nothing to hand back this way

    def run(data):
        """The target on one input, then the trim when needed."""
        try:
            one(data)
        finally:
            with open("/proc/self/statm") as f:
                if int(f.read().split()[1]) * page > TRIM_MB << 20:
                    malloc_trim(0)

    return run


def target(name, instrument=False):
    """The one-input function of a target."""
    warnings.simplefilter("ignore")  # Pillow warns about every malformed tag it skips
    codec, encryption, imagefiles = import_targets(instrument)
    return trimmed({"decode": lambda: decode_target(codec), "container": lambda: container_target(encryption),
                    "images": lambda: images_target(imagefiles)}[name]())


def make_corpus():
    """Write the seed corpora: the conformance files and a few ctx files (decode), small containers, small
    images of every format Pillow writes here."""
    import numpy as np
    from PIL import Image

    import codec
    import encryption
    from checkpoint import model_id

    corpus = {t: os.path.join(FUZZ_DIR, "corpus", t) for t in TARGETS}
    for folder in corpus.values():
        os.makedirs(folder, exist_ok=True)
    conformance = os.path.join(ROOT, "tests", "conformance")
    files = {n: open(os.path.join(conformance, n), "rb").read() for n in sorted(os.listdir(conformance)) if n.endswith(".qae")}
    m = ctx_model()
    rng = np.random.default_rng(0)
    for i, (h, w, q, coder, mode) in enumerate([(16, 24, 1, "constriction", "RGB"), (33, 17, 8, "arithmetic-compressor", "RGBA"),
                                                 (1, 1, 4.5, "constriction", "L"), (24, 1100, 3, "constriction", "RGB")]):
        rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        alpha = rng.integers(0, 256, (h, w), dtype=np.uint8) if mode == "RGBA" else None
        files[f"ctx_{w}x{h}_q{q}_{coder[:5]}.qae"] = codec.compress(m, model_id(m.state_dict()), rgb, mode, alpha, q, coder)
    for name, data in files.items():
        open(os.path.join(corpus["decode"], name), "wb").write(data)
    for name in ("rd_rgb_64x48_q1_const_v4.qae", "ctx_24x16_q1_const.qae"):
        sealed = encryption.encrypt(files[name], PASSPHRASE, log2_n=4, r=1, p=1)  # cheap key derivation
        open(os.path.join(corpus["container"], name.replace(".qae", ".qax")), "wb").write(sealed)
    img = Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8))
    for fmt, mode, kw in (("PNG", "RGB", {}), ("PNG", "RGBA", {}), ("PNG", "P", {}), ("PNG", "I;16", {}),
                          ("JPEG", "RGB", {"quality": 80}), ("JPEG", "L", {}), ("TIFF", "RGB", {}), ("TIFF", "CMYK", {}),
                          ("GIF", "P", {}), ("WEBP", "RGB", {"quality": 70}), ("BMP", "RGB", {})):
        buf = io.BytesIO()
        img.convert(mode).save(buf, fmt, **kw)
        open(os.path.join(corpus["images"], f"{fmt.lower()}_{mode.replace(';', '')}.{fmt.lower()}"), "wb").write(buf.getvalue())
    print("corpora in", os.path.join(FUZZ_DIR, "corpus"), {t: len(os.listdir(f)) for t, f in corpus.items()})


def replay(name, paths):
    """Run inputs through a target without fuzzing (regression inputs, reproducing a crash)."""
    one = target(name)
    for path in paths:
        with open(path, "rb") as f:
            one(f.read())
        print("ok", path)


def main(argv):
    """Dispatch: --make-corpus, --replay TARGET FILES…, or TARGET [libFuzzer flags / corpus folders]."""
    if argv[:1] == ["--make-corpus"]:
        return make_corpus()
    if argv[:1] == ["--replay"] and len(argv) >= 2 and argv[1] in TARGETS:
        return replay(argv[1], argv[2:])
    if not argv or argv[0] not in TARGETS:
        sys.exit(__doc__ + f"\nerror: name a target: {', '.join(TARGETS)}")
    import atheris

    name, flags = argv[0], argv[1:]
    one = target(name, instrument=True)
    if not any(not f.startswith("-") for f in flags):  # new inputs go to a scratch folder, not into the repository
        work = tempfile.mkdtemp(prefix=f"fuzz-{name}-")
        flags += [work, os.path.join(FUZZ_DIR, "corpus", name)]
        if not any(f.startswith("-artifact_prefix=") for f in flags):
            flags.append(f"-artifact_prefix={work}/")
        print(f"new inputs and any crash go to {work}/", file=sys.stderr)
    if not any(f.startswith("-dict=") for f in flags):
        flags.append("-dict=" + os.path.join(FUZZ_DIR, "qae.dict"))
    given = {f.split("=")[0] for f in flags}
    flags = [f for f in DEFAULT_FLAGS if f.split("=")[0] not in given] + flags
    atheris.Setup([sys.argv[0]] + flags, one)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv[1:])
