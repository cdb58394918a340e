"""test.py and metrics.py end to end with tiny checkpoints; odd inputs keep their size and mode."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from conftest import ROOT, photo_like

import effort
import metrics
from runtime import cpu_has_bf16


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
    Image.fromarray(rgb).convert("LA").save(folder / "la.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    Image.fromarray(rgb).save(folder / "exif.jpg", exif=exif)
    frames = [Image.fromarray(rgb), Image.fromarray(255 - rgb)]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:])
    return folder


@pytest.mark.parametrize("ckpt", ["rd_ckpt", "hyper_ckpt", "seed_ckpt"])
def test_folder_mode_and_metrics(ckpt, odd_images, tmp_path, request):
    weights = request.getfixturevalue(ckpt)
    comp, dec = tmp_path / "c", tmp_path / "d"
    folder = ("--weights", weights, "--images", str(odd_images), "--compressed-dir", str(comp), "--decompressed-dir", str(dec))
    if ckpt == "seed_ckpt":  # the seed has no quality knob: asking for one is an error, not silently ignored
        assert one_line_error(run("test.py", *folder, "--quality", "3")) and not comp.exists()
    r = run("test.py", *folder, *(("--quality", "3") if ckpt != "seed_ckpt" else ()))
    assert r.returncode == 0, r.stderr
    assert "mean (10)" in r.stdout and "only the first is compressed" in r.stderr
    for name in os.listdir(odd_images):
        stem = os.path.splitext(name)[0]
        with Image.open(odd_images / name) as a, Image.open(dec / f"{stem}.png") as b:
            assert ImageOps.exif_transpose(a).size == b.size  # the displayed size: exif.jpg comes out upright
            assert ("A" in b.getbands()) == (stem in ("rgba", "la"))
            assert b.mode in (("L", "LA") if stem in ("gray", "deep16", "la") else ("RGB", "RGBA"))
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


def test_workers_and_shards_cover_the_folder_once(rd_ckpt, tmp_path):
    """Two shards (one run with a 2-process pool) split the files with no overlap; their results merge."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(6):
        Image.fromarray(photo_like(24 + 4 * i, 40, i)).save(folder / f"im{i}.png")
    common = ["--weights", rd_ckpt, "--images", str(folder), "--compressed-dir", str(tmp_path / "c"),
              "--decompressed-dir", str(tmp_path / "d"), "--quality", "4"]
    done = []
    for i, workers in ((0, "2"), (1, "1")):
        r = run("test.py", *common, "--shard", f"{i}/2", "--workers", workers, "--results", str(tmp_path / f"s{i}.csv"))
        assert r.returncode == 0, r.stderr
        done.append({row["image"] for row in metrics.read_results(str(tmp_path / f"s{i}.csv"))})
    assert not done[0] & done[1] and done[0] | done[1] == {f"im{i}" for i in range(6)}
    r = run("metrics.py", "--merge", str(tmp_path / "s0.csv"), str(tmp_path / "s1.csv"), "--json", str(tmp_path / "all.json"))
    assert r.returncode == 0 and "mean (6 images)" in r.stdout, r.stderr
    merged = json.load(open(tmp_path / "all.json"))["images"]
    assert [row["bytes"] for row in merged] == [os.path.getsize(tmp_path / "c" / f"im{i}.qae") for i in range(6)]
    r = run("test.py", *common, "--shard", "2/2")
    assert one_line_error(r) and "--shard" in r.stderr


def test_plot_training_chains_phases(tmp_path):
    """Two phases of a run (the second started with --init) are drawn end to end, steps continued."""
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import plot_training

    head = "step,epoch,minutes,lr,loss,mse,psnr,bpp,samples_per_s\n"
    for i, (a, b) in enumerate([(10, 20), (5, 15)]):
        (tmp_path / f"p{i}").mkdir()
        (tmp_path / f"p{i}" / "rd_log.csv").write_text(head + f"{a},0,1.0,1e-3,2.0,0.001,30,1.0,20\n"
                                                             f"{b},0,2.0,1e-3,1.9,0.001,31,0.9,20\n")
        (tmp_path / f"p{i}" / "losses.txt").write_text(f"rd epoch 1 step {b} train_loss 2 val_loss 2 val_psnr 30.5 val_bpp 0.9\n")
    logs = [str(tmp_path / f"p{i}" / "rd_log.csv") for i in range(2)]
    rows, val, bounds = plot_training.chain(logs, [str(tmp_path / f"p{i}" / "losses.txt") for i in range(2)], "rd")
    assert [r["step"] for r in rows] == [10, 20, 25, 35] and [r["minutes"] for r in rows] == [1, 2, 3, 4]
    assert [v[0] for v in val] == [20, 35] and bounds == [2.0]
    r = run("tools/plot_training.py", *logs, "--out", str(tmp_path / "t.png"))
    assert r.returncode == 0 and (tmp_path / "t.png").stat().st_size > 1000


def test_plot_trials_reads_a_runs_weight_average_beside_its_weights(tmp_path):
    """A losses.txt line of a run trained with --ema gives a point of the weights and one of their average; plot_training
    still reads the weights' own validation from it."""
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import plot_trials
    import plot_training

    lines = ["r epoch 1 step 10 train_loss 2 val_loss 1.5 val_psnr 30.5 val_bpp 0.9 minutes 1.0 cpu_minutes 2.0\n",
             "r epoch 2 step 20 train_loss 2 val_loss 1.4 val_psnr 30.6 val_bpp 0.8 minutes 2.0 cpu_minutes 4.0 "
             "ema_val_loss 1.3 ema_val_psnr 31.0 ema_val_bpp 0.7\n"]
    (tmp_path / "losses.txt").write_text("".join(lines))
    assert plot_trials.read_run(str(tmp_path / "losses.txt")) == ([(2.0, 1.5), (4.0, 1.4)], [(4.0, 1.3)])
    assert plot_training.read_validation(str(tmp_path / "losses.txt"), "r") == [(10, 30.5, 0.9), (20, 30.6, 0.8)]
    r = run("tools/plot_trials.py", f"{tmp_path / 'losses.txt'}:r", "--out", str(tmp_path / "t.png"))
    assert r.returncode == 0 and "r, weight average: 4 min 1.30000" in r.stdout, r.stderr


def test_gpu_check_runs_on_any_device(hyper_ckpt, tmp_path):
    """gpu_check.py compares the CPU with --device (here the CPU itself: everything must match) and
    says clearly when the device does not exist."""
    Image.fromarray(photo_like(40, 56, 3)).save(tmp_path / "a.png")
    out = tmp_path / "check.json"
    r = run("tools/gpu_check.py", "--weights", hyper_ckpt, "--images", str(tmp_path), "--qualities", "1,8",
            "--device", "cpu", "--out", str(out))
    assert r.returncode == 0, r.stderr
    figures = json.loads(out.read_text())
    pairs = [v for v in figures.values() if isinstance(v, dict)]
    assert len(pairs) == 2 and all(v["same_file"] and v["max_pixel_diff_cpu_vs_device_decode"] == 0 for v in pairs)
    assert one_line_error(run("tools/gpu_check.py", "--weights", hyper_ckpt, "--device", "cuda:99"))


def test_amp_gradients_compares_bf16_with_a_new_draw(ctx_ckpt, tmp_path):
    """amp_gradients.py prints each part's fp32 gradient, a new draw's spread and bf16's error; with every
    transform kept in fp32 the error is exactly zero (the three passes share their noise). Without bf16 in
    hardware it refuses in one line."""
    for i in range(2):
        Image.fromarray(photo_like(70, 80, i)).save(tmp_path / f"{i}.png")
    args = ("--weights", ctx_ckpt, "--data", str(tmp_path), "--crop", "64", "--keep-fp32", "g_a,g_s")
    r = run("tools/amp_gradients.py", *args)
    if not cpu_has_bf16():
        assert one_line_error(r)
        return
    assert r.returncode == 0, r.stderr
    rows = {line.split()[0]: [float(v) for v in line.split()[1:]] for line in r.stdout.splitlines()[2:]}
    assert {"g_a", "g_s"} <= set(rows) and all(v[0] > 0 and v[1] > 0 and v[2] == 0 for v in rows.values())
    assert one_line_error(run("tools/amp_gradients.py", "--weights", ctx_ckpt, "--data", str(tmp_path), "--crop", "512"))


@pytest.mark.parametrize("ckpt", ["rd_ckpt", "hyper_ckpt", "ctx_ckpt", "resctx_ckpt"])
def test_coding_report_measures_both_coders(ckpt, tmp_path, request):
    """coding_report.py codes every image at every quality with both coders (round trip asserted inside),
    prints the shares and thread check, and refuses a quality outside the model's range in one line."""
    weights = request.getfixturevalue(ckpt)
    for i in range(2):
        Image.fromarray(photo_like(40, 56, i)).save(tmp_path / f"{i}.png")
    r = run("tools/coding_report.py", "--weights", weights, "--data", str(tmp_path), "--quality", "1", "3", "--repeat", "1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("symbols identical in 2/2 images") == 2
    assert r.stdout.count("arithmetic-compressor") == 2 and "share of the whole time" in r.stdout
    assert one_line_error(run("tools/coding_report.py", "--weights", weights, "--data", str(tmp_path), "--quality", "99"))
    if ckpt == "rd_ckpt":  # the seed has no entropy model to report on
        assert one_line_error(run("tools/coding_report.py", "--weights", request.getfixturevalue("seed_ckpt"), "--data", str(tmp_path)))


def test_empty_shards_merge_and_a_missing_results_file_is_one_line(rd_ckpt, tmp_path):
    """A shard with no images still writes its (empty) results file, so merging every shard works; a missing file
    is a one-line error, not a traceback."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(photo_like(24, 24)).save(folder / "only.png")
    common = ["--weights", rd_ckpt, "--images", str(folder), "--compressed-dir", str(tmp_path / "c"),
              "--decompressed-dir", str(tmp_path / "d")]
    for i in range(3):
        assert run("test.py", *common, "--shard", f"{i}/3", "--results", str(tmp_path / f"s{i}.csv")).returncode == 0
    r = run("metrics.py", "--merge", *(str(tmp_path / f"s{i}.csv") for i in range(3)))
    assert r.returncode == 0 and "mean (1 images)" in r.stdout, r.stderr
    r = run("metrics.py", "--merge", str(tmp_path / "missing.csv"))
    assert one_line_error(r) and "missing.csv" in r.stderr


def test_head_to_head_notes_little_overlap_only_when_a_cell_is_marked():
    import benchmark

    curve = lambda name, bpp, psnr: {"name": name, "description": name, "results": {"bpp": bpp, "psnr-rgb": psnr}}  # noqa: E731
    ours = curve("ours-a", [0.2, 0.5, 1.0, 2.0], [28.0, 31.0, 34.0, 37.0])
    near = curve("near", [0.25, 0.6, 1.2, 2.4], [28.0, 31.0, 34.0, 37.0])
    far = curve("far", [2.0, 3.0, 4.0, 5.0], [36.0, 38.0, 40.0, 42.0])
    assert "overlap little" not in benchmark.head_to_head([ours], [ours, near])
    assert "overlap little" in benchmark.head_to_head([ours], [ours, near, far])


def test_a_folder_compresses_on_a_local_dask_cluster(rd_ckpt, tmp_path):
    """tools/dask_compress.py on a 2-worker local cluster: one file per photo (subfolders mirrored), each decoding
    to its photo's size, the same bytes as a local compress; a Codec pickles as its path, loaded once per process."""
    import pickle

    import qae

    folder = tmp_path / "imgs"
    for i, rel in enumerate(["a.png", "sub/b.png", "c.png"]):
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(photo_like(24 + 8 * i, 32, i)).save(folder / rel)
    r = run("tools/dask_compress.py", "--images", str(folder), "--out", str(tmp_path / "out"), "--weights", rd_ckpt,
            "--workers", "2", "--quality", "3")
    assert r.returncode == 0 and "3 photos" in r.stdout, r.stderr
    codec = qae.Codec(rd_ckpt)
    for i, rel in enumerate(["a", "sub/b", "c"]):
        data = (tmp_path / "out" / f"{rel}.qae").read_bytes()
        assert data == codec.compress(str(folder / f"{rel}.png"), quality=3)
        assert codec.decompress(data).size == (32, 24 + 8 * i)
    blob = pickle.dumps(codec)
    assert len(blob) < 1000 and pickle.loads(blob) is pickle.loads(blob)  # a path, resolved once per process


def test_store_precision_writes_a_smaller_model_that_codes(resctx_ckpt, tmp_path):
    """store_precision.py rounds a checkpoint to fp16: a smaller file of its own identity, with tables of the rounded
    weights, that compresses and decompresses; it refuses to replace its source."""
    from checkpoint import load_checkpoint
    from codec import compress, decompress

    dst = tmp_path / "half.pt"
    r = run("tools/store_precision.py", resctx_ckpt, str(dst), "--precision", "fp16")
    assert r.returncode == 0, r.stderr
    (model, ckpt), (_, source) = load_checkpoint(str(dst)), load_checkpoint(resctx_ckpt)
    assert ckpt["model_id"] != source["model_id"] and os.path.getsize(dst) < 0.75 * os.path.getsize(resctx_ckpt)
    assert source["model_id"] in ckpt["notes"]
    tables = {k: v.clone() for k, v in model.state_dict().items() if not v.is_floating_point()}
    model.build_tables()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in tables.items())
    rgb = photo_like(48, 64, 3)
    mid = bytes.fromhex(ckpt["model_id"])
    assert decompress(model, mid, compress(model, mid, rgb, quality=4))[0].shape == rgb.shape
    assert one_line_error(run("tools/store_precision.py", resctx_ckpt, resctx_ckpt))
