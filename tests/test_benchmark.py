"""benchmark.py end to end on two small images, and the BD-rate helper."""
import csv
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from conftest import ROOT, photo_like

import benchmark


def test_benchmark_end_to_end(rd_ckpt, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(2):
        Image.fromarray(photo_like(176, 192, i)).save(data / f"img{i}.png")
    out = tmp_path / "out"
    cmd = [sys.executable, os.path.join(ROOT, "benchmark.py"), "--data", str(data), "--out", str(out),
           "--codecs", "ours,jpeg420,webp", "--weights", rd_ckpt, "--qualities", "1,4,8"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    for name in ("ours-rd_tiny", "jpeg420", "webp"):
        d = json.load(open(out / f"{name}.json"))
        assert {"name", "description", "results"} <= set(d)
        assert {"bpp", "psnr-rgb", "ms-ssim-rgb", "encoding_time", "decoding_time"} <= set(d["results"])
        assert len(d["results"]["bpp"]) == len(d["results"]["psnr-rgb"]) >= 3
    rows = list(csv.DictReader(open(out / "points.csv")))
    assert {r["codec"] for r in rows} == {"ours-rd_tiny", "jpeg420", "webp"}
    for png in ("rd_psnr.png", "rd_msssim.png", "visual.png"):
        assert Image.open(out / png).size[0] > 100
    assert "| JPEG 4:2:0" in (out / "bd_rates.md").read_text()
    assert (out / "ours.md").read_text().count("| rd_tiny |") == 3
    duel = (out / "head_to_head.md").read_text()
    assert "| codec | rd_tiny |" in duel and "| JPEG 4:2:0 (libjpeg-turbo) |" in duel
    assert "| ours: rd_tiny, effort 0 | +0.0 % |" in (out / "speed_tradeoff.md").read_text()
    assert Image.open(out / "speed_tradeoff.png").size[0] > 100
    # --report-only rebuilds the tables from the JSONs without coding anything.
    (out / "bd_rates.md").unlink()
    r3 = subprocess.run([sys.executable, os.path.join(ROOT, "benchmark.py"), "--out", str(out), "--report-only"],
                        capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r3.returncode == 0 and "| JPEG 4:2:0" in (out / "bd_rates.md").read_text(), r3.stderr
    # ... and, given the picture, visual.png again: its image coded once per codec whose weights are at hand.
    (out / "visual.png").unlink()
    bpp = json.load(open(out / "jpeg420.json"))["per_image"][1]["images"][0]["bpp"]
    r4 = subprocess.run([sys.executable, os.path.join(ROOT, "benchmark.py"), "--out", str(out), "--report-only",
                         "--data", str(data), "--visual-image", "img0", "--visual-bpp", str(bpp)],
                        capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r4.returncode == 0 and Image.open(out / "visual.png").size[0] >= 2 * 260, r4.stderr
    # A re-run with the cache recomputes nothing: it is fast and gives the same numbers.
    r2 = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r2.returncode == 0 and json.load(open(out / "jpeg420.json")) == json.load(open(out / "jpeg420.json"))


def test_bd_rate_against_itself_and_half_bits():
    curve = {"bpp": [0.2, 0.4, 0.8, 1.6], "psnr-rgb": [27.0, 30.0, 33.0, 36.5]}
    assert benchmark.bd_rate(curve, curve)[0] == pytest.approx(0.0, abs=1e-9)
    half = {"bpp": [b * 0.5 for b in curve["bpp"]], "psnr-rgb": curve["psnr-rgb"]}
    assert benchmark.bd_rate(curve, half)[0] == pytest.approx(-50.0, abs=1e-6)
