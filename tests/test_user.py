"""What a codec user meets first: the Python API, the Pillow plugin, pipes, `info`, refusals of silent
surprises, output permissions, honest folder summaries, and commands that work from any folder."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, photo_like

import qae

SHIPPED = os.path.join(ROOT, "weights", "hyper.pt")


def run(*args, cwd=ROOT, stdin=None):
    """test.py with arguments, as a user runs it (bytes in and out)."""
    return subprocess.run([sys.executable, os.path.join(ROOT, "test.py"), *args], cwd=cwd, input=stdin,
                          capture_output=True, timeout=300)


@pytest.fixture(scope="module")
def tiny(rd_ckpt):
    """A codec of the tiny rd checkpoint, finding files' checkpoints in its folder."""
    return qae.Codec(rd_ckpt, weights_dir=os.path.dirname(rd_ckpt))


@pytest.mark.parametrize("form", ["path", "pil", "array", "gray_array", "rgba_pil"])
def test_api_round_trip_of_every_input_form(tiny, form, tmp_path):
    """compress accepts a path, a PIL image or an array; decompress gives a PIL image of the same size and mode."""
    rgb = photo_like(30, 44, 1)
    image = {"path": None, "pil": Image.fromarray(rgb), "array": rgb, "gray_array": rgb[..., 0],
             "rgba_pil": Image.fromarray(np.dstack([rgb, rgb[..., 1]]), "RGBA")}[form]
    if form == "path":
        image = str(tmp_path / "in.png")
        Image.fromarray(rgb).save(image)
    out = tiny.decompress(tiny.compress(image, quality=3))
    assert out.size == (44, 30)
    assert out.mode == {"gray_array": "L", "rgba_pil": "RGBA"}.get(form, "RGB")


def test_api_info_encryption_and_errors(tiny):
    """info reads the header without decoding; encrypted data needs its passphrase; bad input is one error type."""
    data = tiny.compress(photo_like(20, 20), quality=2.5)
    head = qae.info(data)
    assert (head["width"], head["height"], head["quality"], head["bytes"]) == (20, 20, 2.5, len(data))
    assert head["bpp"] == pytest.approx(8 * len(data) / 400) and head["encrypted"] is False
    sealed = tiny.compress(photo_like(20, 20), quality=2.5, passphrase="pw")
    assert qae.info(sealed)["encrypted"] is True
    with pytest.raises(qae.FormatError, match="encrypted"):
        tiny.decompress(sealed)
    assert tiny.decompress(sealed, passphrase="pw").size == (20, 20)
    with pytest.raises(qae.FormatError):
        tiny.decompress(data[:-1])
    with pytest.raises(ValueError, match="uint8"):
        tiny.compress(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(TypeError):
        tiny.compress(12)


def test_api_finds_the_model_that_made_a_file(tiny, rd_ckpt, hyper_ckpt, tmp_path):
    """A file from another checkpoint decodes when that checkpoint is in weights_dir, else is a FormatError."""
    other = qae.Codec(hyper_ckpt)
    data = other.compress(photo_like(16, 24), quality=4)
    with pytest.raises(qae.FormatError, match="no checkpoint.*git log -- weights/"):  # where earlier weights are
        tiny.decompress(data)
    folder = tmp_path / "w"
    folder.mkdir()
    shutil.copy(hyper_ckpt, folder)
    assert qae.Codec(rd_ckpt, weights_dir=str(folder)).decompress(data).size == (24, 16)


def test_pillow_plugin_opens_and_saves_qae(tmp_path):
    """After `import pillow_qae`, Image.open reads .qae files and Image.save writes them (default model)."""
    import pillow_qae  # noqa: F401

    rgb = photo_like(48, 64, 2)
    path = str(tmp_path / "x.qae")
    Image.fromarray(rgb).save(path, quality=3)
    with open(path, "rb") as f:
        assert qae.info(f.read())["quality"] == 3
    with Image.open(path) as im:
        assert im.format == "QAE" and im.size == (64, 48) and im.mode == "RGB"
        pixels = np.asarray(im.convert("RGB"))
    assert np.abs(pixels.astype(int) - rgb).mean() < 20


def test_pipes_info_and_refusals(tmp_path):
    """"-" is stdin / stdout both ways; info prints the header; lossy or unknown outputs are refused."""
    src = tmp_path / "in.png"
    Image.fromarray(photo_like(40, 40, 3)).save(src)
    r = run("compress", "-", "-", "--quality", "2", stdin=src.read_bytes())
    assert r.returncode == 0 and r.stdout[:3] == b"QAE", r.stderr
    qae_path = tmp_path / "in.qae"
    qae_path.write_bytes(r.stdout)
    r = run("decompress", "-", "-", stdin=r.stdout)
    assert r.returncode == 0 and r.stdout[:8] == b"\x89PNG\r\n\x1a\n", r.stderr
    r = run("info", str(qae_path))
    assert r.returncode == 0 and b"quality        2.0" in r.stdout and b"width          40" in r.stdout
    for name, message in (("out.jpg", b"--allow-lossy"), ("out.txt", b"not an image file name")):
        r = run("decompress", str(qae_path), str(tmp_path / name))
        assert r.returncode == 1 and message in r.stderr and not (tmp_path / name).exists()
    assert run("decompress", str(qae_path), str(tmp_path / "ok.jpg"), "--allow-lossy").returncode == 0
    r = run("compress", str(src), str(tmp_path / "x.bin"))
    assert r.returncode == 0 and b"does not end in .qae" in r.stderr


def test_commands_work_from_any_folder_and_outputs_are_readable(tmp_path):
    """From another working directory the shipped weights are still found; files get 0666 less the umask."""
    src = tmp_path / "in.png"
    Image.fromarray(photo_like(32, 32, 4)).save(src)
    old = os.umask(0o022)
    try:
        assert run("compress", str(src), "a.qae", cwd=tmp_path).returncode == 0
        assert run("decompress", "a.qae", "b.png", cwd=tmp_path).returncode == 0
    finally:
        os.umask(old)
    for name in ("a.qae", "b.png"):
        assert os.stat(tmp_path / name).st_mode & 0o777 == 0o644


def test_folder_summary_counts_bits_over_all_pixels(rd_ckpt, tmp_path):
    """A 1×1 image cannot dominate the folder's figure: bits over all pixels are reported beside the means."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(photo_like(64, 64, 5)).save(folder / "big.png")
    Image.fromarray(photo_like(1, 1, 6)).save(folder / "dot.png")
    r = run("--weights", rd_ckpt, "--images", str(folder), "--compressed-dir", str(tmp_path / "c"),
            "--decompressed-dir", str(tmp_path / "d"), "--quality", "2")
    assert r.returncode == 0, r.stderr
    total = sum(os.path.getsize(p) for p in (tmp_path / "c").iterdir())
    assert f"{total} bytes for 4,097 pixels = {8 * total / 4097:.3f} bpp".encode() in r.stdout


def test_help_answers_without_torch():
    """--help and argument errors do not import torch (the slow part of starting)."""
    code = ("import sys; sys.argv = ['test.py', '--help']; sys.path.insert(0, %r); import test as t\n"
            "try:\n    t.parse_args()\nexcept SystemExit:\n    pass\nprint('torch' in sys.modules)") % ROOT
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.stdout.strip().endswith("False"), r.stdout + r.stderr


def test_api_reads_paths_and_file_objects_and_refuses_non_qae_quickly(tiny, tmp_path):
    """decompress and info take bytes, a path or a file object; a stream that does not start like a .qae file is
    refused from its first bytes (an endless one too); a wrong passphrase is a FormatError like any bad file."""
    data = tiny.compress(photo_like(20, 28), quality=2)
    path = tmp_path / "x.qae"
    path.write_bytes(data)
    assert tiny.decompress(str(path)).size == tiny.decompress(open(path, "rb")).size == (28, 20)
    assert qae.info(path) == qae.info(data)

    class Endless:
        def read(self, n=-1):
            assert n != -1, "read the whole endless stream"
            return bytes(n)

    with pytest.raises(qae.FormatError, match="wrong magic"):
        qae.info(Endless())
    with pytest.raises(qae.FormatError, match="wrong passphrase"):
        tiny.decompress(tiny.compress(photo_like(8, 8), passphrase="right"), passphrase="wrong")


def test_api_works_inside_inference_mode(tmp_path, ctx_ckpt):
    """Users wrap inference in torch.inference_mode(): the codec sets its own autograd mode (ctx keeps tensor
    versions, which inference tensors lack)."""
    import torch

    codec = qae.Codec(ctx_ckpt, weights_dir=os.path.dirname(ctx_ckpt))
    rgb = photo_like(24, 40, 5)
    plain = codec.compress(rgb, quality=4)
    with torch.inference_mode():
        inside = codec.compress(rgb, quality=4)
        image = codec.decompress(inside)
    assert inside == plain and np.array_equal(np.asarray(image), np.asarray(codec.decompress(plain)))


def test_options_before_a_subcommand_and_writing_over_the_input_are_refused(tmp_path):
    """`test.py --quality 2 compress …` used to code at quality 8 and `--encrypt compress` to write a plain file;
    `compress a.png a.png` replaced the photo. Each is now a one-line error that writes nothing."""
    src = tmp_path / "in.png"
    Image.fromarray(photo_like(24, 24, 6)).save(src)
    for early in (["--quality", "2"], ["--quality=2"], ["--encrypt"], ["--weights", SHIPPED], ["--images", "x"]):
        r = run(*early, "compress", str(src), str(tmp_path / "out.qae"))
        assert r.returncode == 2 and b"must come after 'compress'" in r.stderr and not (tmp_path / "out.qae").exists()
    before = src.read_bytes()
    r = run("compress", str(src), str(src))
    assert r.returncode == 1 and b"is the input file" in r.stderr and src.read_bytes() == before
    assert run("compress", str(src), str(tmp_path / "a.qae"), "--quality", "2").returncode == 0
    r = run("decompress", str(tmp_path / "a.qae"), str(tmp_path / "a.qae"))
    assert r.returncode == 1 and qae.info(tmp_path / "a.qae")["quality"] == 2
    r = run("info", "/dev/zero")
    assert r.returncode == 1 and b"wrong magic" in r.stderr


def test_folder_mode_keeps_every_output_distinct(rd_ckpt, tmp_path):
    """Subfolders are mirrored, so sub/a.png and a.png each get their own files (with 2 workers, each decodes its
    own); a.png beside a.jpg would share outputs and is refused before any work."""
    images = tmp_path / "imgs"
    for i, rel in enumerate(["a.png", "sub/a.png", "d1/x.png", "d2/x.png"]):
        (images / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(photo_like(32, 32 + 8 * i, i)).save(images / rel)
    out = [f"--compressed-dir={tmp_path / 'c'}", f"--decompressed-dir={tmp_path / 'd'}"]
    r = run("--images", str(images), "--weights", rd_ckpt, "--workers", "2", "--quality", "8", *out)
    assert r.returncode == 0, r.stderr
    for rel in ("a", "sub/a", "d1/x", "d2/x"):
        assert (tmp_path / "c" / f"{rel}.qae").exists() and (tmp_path / "d" / f"{rel}.png").exists()
    widths = [Image.open(tmp_path / "d" / f"{rel}.png").size[0] for rel in ("a", "sub/a", "d1/x", "d2/x")]
    assert widths == [32, 40, 48, 56]  # each output decodes its own input
    Image.fromarray(photo_like(16, 16)).save(images / "a.jpg")
    r = run("--images", str(images), "--weights", rd_ckpt, *out)
    assert r.returncode == 1 and b"would both be written as a.qae" in r.stderr


def test_outputs_that_do_not_keep_every_pixel_need_allow_lossy(rd_ckpt, tmp_path):
    """GIF (palette), ICO (256×256 at most) and PDF (JPEG inside) are refused like JPEG; TIFF and BMP are not."""
    src = tmp_path / "in.png"
    Image.fromarray(photo_like(24, 24, 7)).save(src)
    assert run("compress", str(src), str(tmp_path / "x.qae"), "--weights", rd_ckpt).returncode == 0
    args = ["--weights", rd_ckpt]
    for name in ("o.gif", "o.ico", "o.pdf", "o.jpg"):
        r = run("decompress", str(tmp_path / "x.qae"), str(tmp_path / name), *args)
        assert r.returncode == 1 and b"--allow-lossy" in r.stderr and not (tmp_path / name).exists()
    for name in ("o.tif", "o.bmp"):
        assert run("decompress", str(tmp_path / "x.qae"), str(tmp_path / name), *args).returncode == 0
    assert run("decompress", str(tmp_path / "x.qae"), str(tmp_path / "o.gif"), "--allow-lossy", *args).returncode == 0


def test_info_into_a_closed_pipe_is_quiet(tiny, tmp_path):
    """`test.py info x.qae | head -1`: a reader that stops early gets no "Broken pipe" error from us."""
    path = tmp_path / "x.qae"
    path.write_bytes(tiny.compress(photo_like(16, 16)))
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "test.py"), "info", str(path)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    p.stdout.close()  # the reader is gone before anything is written
    err = p.stderr.read()
    assert p.wait(timeout=120) == 0 and err == b"", err


def test_the_command_line_lets_idle_threads_sleep_unless_told_otherwise():
    """test.py sets OMP_WAIT_POLICY=PASSIVE before torch loads (spinning threads on busy cores cost 2.3×, measured);
    a policy the user set is kept."""
    code = "import os, sys; sys.path.insert(0, sys.argv[1]); import test; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code, ROOT], env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "PASSIVE", out.stderr
    out = subprocess.run([sys.executable, "-c", code, ROOT], env={**env, "OMP_WAIT_POLICY": "ACTIVE"},
                         capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "ACTIVE", out.stderr


def test_modes_that_do_not_come_back_are_announced_and_unwritable_outputs_named(tiny, tmp_path):
    """Palette, CMYK and 16-bit inputs decode as RGB / L: test.py says so. A read-only output folder's error names
    the output asked for, not a temporary file (Linux's /proc stands in for a read-only folder)."""
    rgb = photo_like(20, 24, 9)
    paths = {"p.png": Image.fromarray(rgb).convert("P"), "c.jpg": Image.fromarray(rgb).convert("CMYK"),
             "g16.png": Image.fromarray(rgb[..., 0].astype(np.uint16) * 257)}
    for name, im in paths.items():
        im.save(tmp_path / name)
        r = run("compress", str(tmp_path / name), str(tmp_path / f"{name}.qae"), "--weights", SHIPPED)
        assert r.returncode == 0 and b"is coded and decoded as" in r.stderr, (name, r.stderr)
    unwritable = "/proc/out.qae"  # a folder no one may create files in, root included
    r = run("compress", str(tmp_path / "p.png"), unwritable, "--weights", SHIPPED)
    assert r.returncode == 1 and b"cannot write /proc/out.qae" in r.stderr and b".tmp-" not in r.stderr, r.stderr


def test_info_reads_the_header_without_torch(tiny, tmp_path):
    """`test.py info` prints a header without importing PyTorch (it used to take 1.5 s to start)."""
    path = tmp_path / "x.qae"
    path.write_bytes(tiny.compress(photo_like(16, 16), quality=3))
    code = ("import sys; sys.path.insert(0, %r); import test as t\nt.main(['info', %r])\nprint('torch' in sys.modules)"
            % (ROOT, str(path)))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert "quality        3.0" in r.stdout and r.stdout.strip().endswith("False"), r.stdout + r.stderr
