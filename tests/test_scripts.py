"""test.py and metrics.py end to end with tiny checkpoints; odd inputs keep their size and mode."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, photo_like

import metrics


def run(script, *args, cwd=ROOT):
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def one_line_error(r):
    return r.returncode != 0 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def odd_images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("odd")
    rgb = photo_like(45, 70)
    Image.fromarray(rgb).save(folder / "rgb.png")
    Image.fromarray(rgb[..., 0]).save(folder / "gray.png")
    Image.fromarray(np.dstack([rgb, rgb[..., 1]])).save(folder / "rgba.png")
    Image.fromarray(rgb[:1, :1]).save(folder / "one.png")
    Image.fromarray(rgb).convert("P").save(folder / "palette.png")
    Image.fromarray((rgb[..., 0].astype(np.uint16) * 257)).save(folder / "deep16.png")
    Image.fromarray(rgb).convert("CMYK").save(folder / "cmyk.jpg")
    return folder


@pytest.mark.parametrize("ckpt", ["rd_ckpt", "seed_ckpt"])
def test_folder_mode_and_metrics(ckpt, odd_images, tmp_path, request):
    weights = request.getfixturevalue(ckpt)
    comp, dec = tmp_path / "c", tmp_path / "d"
    r = run("test.py", "--weights", weights, "--images", str(odd_images), "--compressed-dir", str(comp),
            "--decompressed-dir", str(dec), "--quality", "3")
    assert r.returncode == 0, r.stderr
    assert "mean (7)" in r.stdout
    for name in os.listdir(odd_images):
        stem = os.path.splitext(name)[0]
        with Image.open(odd_images / name) as a, Image.open(dec / f"{stem}.png") as b:
            assert a.size == b.size
            assert ("A" in b.getbands()) == (stem == "rgba")
            assert b.mode in (("L",) if stem in ("gray", "deep16") else ("RGB", "RGBA"))
    r = run("metrics.py", "--originals", str(odd_images), "--reconstructions", str(dec),
            "--compressed", str(comp), "--json", str(tmp_path / "m.json"))
    assert r.returncode == 0, r.stderr
    scores = json.load(open(tmp_path / "m.json"))
    rgb_row = next(row for row in scores["images"] if row["image"] == "rgb")
    assert rgb_row["bpp"] == pytest.approx(8 * os.path.getsize(comp / "rgb.qae") / (45 * 70))


def test_single_file_commands_and_bad_files(rd_ckpt, seed_ckpt, tmp_path):
    src = tmp_path / "in.png"
    Image.fromarray(photo_like(33, 65)).save(src)
    out = tmp_path / "out.qae"
    r = run("test.py", "compress", str(src), str(out), "--weights", rd_ckpt, "--quality", "2.5")
    assert r.returncode == 0, r.stderr
    weights_dir = os.path.dirname(rd_ckpt)
    r = run("test.py", "decompress", str(out), str(tmp_path / "back.png"), "--weights-dir", weights_dir)
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "back.png").size == (65, 33)
    data = out.read_bytes()
    bad = {"truncated.qae": data[: len(data) // 2], "flipped.qae": data[:20] + bytes([data[20] ^ 1]) + data[21:],
           "empty.qae": b"", "foreign.qae": src.read_bytes()}
    for name, content in bad.items():
        (tmp_path / name).write_bytes(content)
        target = tmp_path / f"{name}.png"
        r = run("test.py", "decompress", str(tmp_path / name), str(target), "--weights", rd_ckpt)
        assert one_line_error(r), (name, r.stderr)
        assert not target.exists()
    r = run("test.py", "decompress", str(out), str(tmp_path / "x.png"), "--weights", seed_ckpt)
    assert one_line_error(r) and "made by model" in r.stderr
    r = run("test.py", "compress", str(tmp_path / "empty.qae"), str(tmp_path / "y.qae"), "--weights", rd_ckpt)
    assert one_line_error(r) and "not an image" in r.stderr


def test_psnr_has_no_uint8_wraparound():
    a = np.zeros((8, 8, 3), np.uint8)
    b = np.full((8, 8, 3), 255, np.uint8)
    assert metrics.psnr(a, b) == pytest.approx(0.0)  # uint8 subtraction would wrap to 1 and report 48 dB
    assert metrics.psnr(a, a) == metrics.PSNR_CAP
    assert metrics.bpp(1000, 100, 80) == pytest.approx(1.0)
