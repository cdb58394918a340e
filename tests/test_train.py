"""train.py: a tiny model trains, checkpoints atomically, resumes exactly; clear errors for missing data."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, photo_like
from checkpoint import as_stored, load_checkpoint, save_checkpoint
from model import HyperConfig, build_model
from models.base import geometric_ladder

TINY = ["--rd-channels", "8,8", "--crop", "32", "--batch-size", "2", "--warmup", "2", "--threads", "1"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    for i in range(6):
        Image.fromarray(photo_like(40 + 7 * i, 50, i)).save(folder / f"p{i}.png")
    return str(folder)


def train(*args, cwd=ROOT):
    return subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("arch", ["rd", "hyper", "resnet18"])
def test_trains_saves_and_resumes(arch, photos, tmp_path):
    out = str(tmp_path)
    extra = {"rd": TINY, "hyper": ["--rd-channels", "8,8,4", *TINY[2:]], "resnet18": TINY[2:]}[arch]
    r = train("--arch", arch, "--train-dir", photos, "--out", out, "--max-steps", "2", *extra)
    assert r.returncode == 0, r.stderr
    name = "seed_resnet18" if arch == "resnet18" else arch
    model, ckpt = load_checkpoint(os.path.join(out, f"{name}_resume.pt"))
    assert ckpt["step"] == 2 and ckpt["optimizer"]["state"] and ckpt["config"]["kind"] == model.cfg.kind
    shipped = torch.load(os.path.join(out, f"{name}.pt"), weights_only=True)
    assert "optimizer" not in shipped and shipped["step"] == 2 and shipped["recipe"]["arch"] == arch
    r = train("--arch", arch, "--train-dir", photos, "--out", out, "--max-steps", "4", "--resume", *extra)
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr
    assert load_checkpoint(os.path.join(out, f"{name}_resume.pt"))[1]["step"] == 4
    assert not [f for f in os.listdir(out) if ".tmp" in f]


def test_hyper_starts_from_an_rd_checkpoint(photos, tmp_path):
    """--init with an rd checkpoint: the shared transforms are copied, the gains re-interpolated to
    the hyper model's quality ladder, the hyperprior started as per-channel Gaussians."""
    rd_dir, hp_dir = str(tmp_path / "rd"), str(tmp_path / "hp")
    assert train("--arch", "rd", "--train-dir", photos, "--out", rd_dir, "--max-steps", "1", *TINY).returncode == 0
    r = train("--arch", "hyper", "--rd-channels", "8,8,4", "--train-dir", photos, "--out", hp_dir, "--max-steps", "1",
              "--lr", "1e-9", "--warmup", "0", "--init", os.path.join(rd_dir, "rd.pt"), *TINY[2:])
    assert r.returncode == 0 and "copying the weights" in r.stdout and "per-channel Gaussians" in r.stdout, r.stderr
    rd, _ = load_checkpoint(os.path.join(rd_dir, "rd.pt"))
    hp, _ = load_checkpoint(os.path.join(hp_dir, "hyper.pt"))
    assert torch.allclose(rd.g_a[0].weight, hp.g_a[0].weight, atol=1e-6)
    # The rd ladder's quality q has λ = rd.lmbda(q); the hyper model's gain at that λ must match.
    lam, ladder = rd.cfg.lambdas[3], np.array(hp.cfg.lambdas)
    i = int(np.searchsorted(ladder, lam)) - 1
    q_hp = 1 + i + np.log(lam / ladder[i]) / np.log(ladder[i + 1] / ladder[i])
    assert torch.allclose(hp.gains(float(q_hp))[0], rd.gains(4.0)[0], rtol=1e-3)


def test_init_keeps_the_lineage(photos, tmp_path):
    """A run started with --init records the stages that led to its starting point and then its own."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert train("--arch", "rd", "--train-dir", photos, "--out", a, "--max-steps", "2", *TINY).returncode == 0
    r = train("--arch", "rd", "--train-dir", photos, "--out", b, "--max-steps", "3", "--init", os.path.join(a, "rd.pt"), *TINY)
    assert r.returncode == 0, r.stderr
    first = torch.load(os.path.join(a, "rd.pt"), weights_only=False)
    second = torch.load(os.path.join(b, "rd.pt"), weights_only=False)
    assert [h["stage"] for h in first["history"]] == [1] and first["history"][0]["init"] == "fresh"
    assert [h["steps"] for h in second["history"]] == [2, 3] and second["total_steps"] == 5
    assert second["history"][1]["init"].endswith("rd.pt") and second["history"][1]["recipe"]["max_steps"] == 3
    assert "earlier_stages" not in second  # the resume file's bookkeeping stays out of the shipped one


def test_init_from_a_hyper_checkpoint_with_another_ladder(photos, tmp_path):
    """--init with the same kind but another λ ladder: every weight, the hyperprior included, is kept
    (no refit) and the gains are re-interpolated, so equal λ gives equal gains."""
    ladder = HyperConfig().lambdas
    ratio = ladder[1] / ladder[0]
    source = build_model(HyperConfig(N=8, M=8, H=4, lambdas=ladder[1:] + (ladder[-1] * ratio,)))
    torch.manual_seed(0)
    source.log_gain.data.normal_()
    source.build_tables()
    src_path = str(tmp_path / "src.pt")
    save_checkpoint(src_path, source, step=3)
    r = train("--arch", "hyper", "--rd-channels", "8,8,4", "--train-dir", photos, "--out", str(tmp_path / "hp"),
              "--max-steps", "1", "--lr", "1e-9", "--warmup", "0", "--init", src_path, *TINY[2:])
    assert r.returncode == 0 and "another config" in r.stdout and "Gaussians" not in r.stdout, r.stderr
    hp, _ = load_checkpoint(str(tmp_path / "hp" / "hyper.pt"))
    assert hp.cfg.lambdas == ladder
    kept = {"rtol": 1e-3, "atol": 1e-6}  # to the fp16 storage of the shipped checkpoint
    assert torch.allclose(hp.h_s[-1].weight, source.h_s[-1].weight, **kept)
    assert torch.allclose(hp.h_a[0].weight, source.h_a[0].weight, **kept)
    assert torch.allclose(hp.prior.biases[0], source.prior.biases[0], **kept)
    for q in range(1, 8):  # the source's quality q has the λ of the new quality q + 1 (fp16 log-gains: ±0.1 %)
        assert torch.allclose(hp.gains(q + 1.0)[0], source.gains(float(q))[0], rtol=2e-3)


def test_resume_is_exact(photos, tmp_path):
    """2 + 2 resumed steps give the same weights as 4 uninterrupted steps (constant LR: the schedule
    depends on --max-steps, which differs between the runs)."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    base = ["--arch", "rd", "--train-dir", photos, *TINY, "--warmup", "0", "--min-lr-ratio", "1"]
    assert train(*base, "--out", a, "--max-steps", "4").returncode == 0
    assert train(*base, "--out", b, "--max-steps", "2").returncode == 0
    assert train(*base, "--out", b, "--max-steps", "4", "--resume").returncode == 0
    wa = load_checkpoint(os.path.join(a, "rd_resume.pt"))[0].state_dict()
    wb = load_checkpoint(os.path.join(b, "rd_resume.pt"))[0].state_dict()
    assert all(torch.allclose(wa[k].float(), wb[k].float(), atol=1e-6) for k in wa)


def test_weight_average_resumes_exactly_and_is_validated_and_shipped(photos, tmp_path):
    """--ema: 2 + 2 resumed steps give the same average as 4 uninterrupted steps; it differs from the weights, each
    epoch validates it (ema_val_loss) and it ships as NAME_ema.pt / NAME_ema_best.pt; a decay outside (0, 1) is refused."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    base = ["--arch", "rd", "--train-dir", photos, *TINY, "--warmup", "0", "--min-lr-ratio", "1", "--ema", "0.5"]
    assert train(*base, "--out", a, "--max-steps", "4").returncode == 0
    assert train(*base, "--out", b, "--max-steps", "2").returncode == 0
    r = train(*base, "--out", b, "--max-steps", "4", "--resume")
    assert r.returncode == 0 and "weight average (--ema) continued over 2 steps" in r.stdout, r.stderr
    ckpt_a = load_checkpoint(os.path.join(a, "rd_resume.pt"))[1]
    ema_a, ema_b = (load_checkpoint(os.path.join(d, "rd_resume.pt"))[1]["ema"] for d in (a, b))
    assert ema_a["n"] == ema_b["n"] == 4
    assert all(torch.allclose(ema_a["params"][k], ema_b["params"][k], atol=1e-6) for k in ema_a["params"])
    weights = ckpt_a["model"]
    assert any(not torch.allclose(ema_a["params"][k], weights[k].float()) for k in ema_a["params"])
    assert "ema_val_loss" in open(os.path.join(a, "losses.txt")).read()
    shipped, _ = load_checkpoint(os.path.join(a, "rd_ema.pt"))
    assert torch.allclose(shipped.state_dict()["g_s.0.weight"], ema_a["params"]["g_s.0.weight"], atol=1e-3)
    assert os.path.exists(os.path.join(a, "rd_ema_best.pt"))
    r = train(*base[:-1], "1.5", "--out", a, "--max-steps", "1")
    assert r.returncode != 0 and "between 0 and 1" in r.stderr


def test_weight_average_is_exponential_and_ignores_the_tables():
    """WeightAverage: the first update copies the weights, each next one keeps `decay` of the average; entropy tables
    that change size between updates (validation rebuilds them) are not its business."""
    sys.path.insert(0, ROOT)
    from train import WeightAverage

    model = build_model(HyperConfig(N=8, M=8, H=4))
    average = WeightAverage(model, 0.75)
    w = model.g_s[0].weight
    before = w.detach().clone()
    average.update_parameters(model)
    with torch.no_grad():
        w.add_(1.0)
    model.build_tables()  # the tables grow from empty
    average.update_parameters(model)
    assert average.n == 2 and torch.allclose(average.module.g_s[0].weight, before + 0.25)


def test_wsd_branches_a_resumed_run_into_a_linear_cool_down(photos, tmp_path):
    """A run's resume state copied to a new folder and resumed with --schedule wsd holds --lr, then falls
    linearly over --cooldown steps to --min-lr-ratio × --lr at --max-steps; wsd without its steps is refused."""
    a, b = tmp_path / "a", tmp_path / "b"
    base = ["--arch", "rd", "--train-dir", photos, *TINY, "--warmup", "0", "--log-every", "1"]
    assert train(*base, "--out", str(a), "--max-steps", "2", "--min-lr-ratio", "1").returncode == 0
    b.mkdir()
    shutil.copy(a / "rd_resume.pt", b / "rd_resume.pt")
    r = train(*base, "--out", str(b), "--resume", "--schedule", "wsd", "--lr", "1e-3", "--max-steps", "7",
              "--cooldown", "4", "--min-lr-ratio", "0.2", "--notes", "cool-down branch of run a at step 2")
    assert r.returncode == 0, r.stderr
    assert torch.load(b / "rd.pt", weights_only=True)["notes"] == "cool-down branch of run a at step 2"
    rows = [line.split(",") for line in (b / "rd_log.csv").read_text().splitlines()[1:]]
    assert [int(row[0]) for row in rows] == [3, 4, 5, 6, 7]
    assert [float(row[3]) for row in rows] == pytest.approx([1e-3, 8e-4, 6e-4, 4e-4, 2e-4])
    r = train(*base, "--out", str(b), "--schedule", "wsd", "--cooldown", "4")
    assert r.returncode != 0 and "--schedule wsd needs --max-steps" in r.stderr
    r = train(*base, "--out", str(b), "--max-steps", "7", "--cooldown", "4")  # cosine would ignore it
    assert r.returncode != 0 and "--cooldown applies to --schedule wsd only" in r.stderr


def test_compiled_training_steps_like_eager_and_saves_plain_weights(photos, tmp_path):
    """--compile trains the same steps as eager (to float rounding: far less than the last two steps moved the
    weights), and the checkpoint holds the model's own names, not the compiled wrapper's."""
    weights = {}
    for name, steps, flags in (("one", 1, []), ("eager", 3, []), ("compiled", 3, ["--compile"])):
        out = str(tmp_path / name)
        r = train("--arch", "rd", "--train-dir", photos, *TINY, "--max-steps", str(steps), "--out", out, *flags)
        assert r.returncode == 0, r.stderr
        weights[name] = load_checkpoint(os.path.join(out, "rd_resume.pt"))[0].state_dict()
    keys = [k for k, v in weights["eager"].items() if v.is_floating_point()]
    moved = sum((weights["eager"][k] - weights["one"][k]).abs().sum() for k in keys)
    apart = sum((weights["eager"][k] - weights["compiled"][k]).abs().sum() for k in keys)
    assert weights["compiled"].keys() == weights["eager"].keys() and 0 < moved and apart < 0.05 * moved


def test_empty_data_folder_is_explained(tmp_path):
    r = train("--train-dir", str(tmp_path / "nothing"), "--out", str(tmp_path), cwd=str(tmp_path))
    assert r.returncode != 0 and "no training images" in r.stderr and "Traceback" not in r.stderr


def test_perceptual_loss_needs_local_vgg(photos, tmp_path):
    r = train("--arch", "resnet18", "--train-dir", photos, "--out", str(tmp_path), "--perceptual-weight", "0.1")
    assert r.returncode != 0 and "--vgg-weights" in r.stderr and "Traceback" not in r.stderr


def test_two_gloo_processes_match_one_process(photos, tmp_path):
    """torchrun with 2 Gloo workers on the CPU gives the weights of 1 process on the same global batch."""
    base = ["--arch", "rd", "--train-dir", photos, *TINY, "--batch-size", "4", "--max-steps", "3"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    assert train(*base, "--out", one).returncode == 0
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        os.path.join(ROOT, "train.py"), *base, "--out", two],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    wa = load_checkpoint(os.path.join(one, "rd_resume.pt"))[0].state_dict()
    wb = load_checkpoint(os.path.join(two, "rd_resume.pt"))[0].state_dict()
    # Tolerance: the two runs sum the same gradients in a different order (float32 rounding).
    assert all(torch.allclose(wa[k].float(), wb[k].float(), atol=1e-5) for k in wa)
    assert sorted(os.listdir(two)) == sorted(os.listdir(one))  # rank 1 wrote nothing of its own


def test_int8_storage_is_close_and_compact(tmp_path):
    """Seed checkpoints store big weights as int8 + per-channel scale: within ~half a step, ~4× smaller."""
    from conftest import TINY_SEED
    from checkpoint import save_checkpoint
    from model import build_model

    torch.manual_seed(0)
    model = build_model(TINY_SEED).eval()
    paths = {p: str(tmp_path / f"{p}.pt") for p in ("fp32", "int8")}
    for precision, path in paths.items():
        save_checkpoint(path, model, precision=precision, step=1)
    assert os.path.getsize(paths["int8"]) < 0.4 * os.path.getsize(paths["fp32"])
    loaded = load_checkpoint(paths["int8"])[0].state_dict()
    for k, v in model.state_dict().items():
        if v.is_floating_point():
            step = v.abs().amax() / 127 if v.dim() >= 2 else v.abs().amax() * 1e-3
            assert (loaded[k] - v).abs().max() <= 0.55 * step, k  # half a step + the fp16 scale's rounding


def test_learned_checkpoints_ship_fp16_with_tables_of_the_stored_weights(photos, tmp_path):
    """A learned model's shippable checkpoint holds fp16 weights (half the file) and the entropy tables of those
    rounded weights: rebuilding them after loading changes nothing, so the file codes as its own weights say."""
    r = train("--arch", "ctx", "--rd-channels", "16,24,8", "--train-dir", photos, "--max-steps", "2", *TINY[2:],
              "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    model, ckpt = load_checkpoint(str(tmp_path / "ctx.pt"))
    assert ckpt["precision"] == "fp16" and all(v.dtype in (torch.float16, torch.int64, torch.int32, torch.uint8, torch.int16)
                                               for v in ckpt["model"].values())
    stored = {k: v.clone() for k, v in model.state_dict().items() if not v.is_floating_point()}
    model.build_tables()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in stored.items())
    resumed = load_checkpoint(str(tmp_path / "ctx_resume.pt"))[1]
    assert all(v.dtype != torch.float16 for v in resumed["model"].values())  # the run itself goes on in fp32


def test_default_output_is_a_run_folder_not_the_shipped_weights(photos, tmp_path):
    """Without --out a run writes to runs/NAME/ under the working directory; weights/ is left alone."""
    shipped = {f: os.path.getmtime(os.path.join(ROOT, "weights", f)) for f in os.listdir(os.path.join(ROOT, "weights"))}
    r = train("--arch", "rd", "--train-dir", photos, "--max-steps", "1", *TINY, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert {"rd.pt", "rd_resume.pt", "rd_log.csv"} <= set(os.listdir(tmp_path / "runs" / "rd"))
    assert {f: os.path.getmtime(os.path.join(ROOT, "weights", f)) for f in os.listdir(os.path.join(ROOT, "weights"))} == shipped
    assert "perceptual loss" not in r.stdout  # the VGG notice is the seed model's only


def test_entropy_only_trains_the_entropy_model_alone(photos, tmp_path, hyper_ckpt):
    """--entropy-only from a hyper checkpoint into a ctx model: the transforms and gains stay exactly as
    started (as the shipped file stores them), the hyperprior and context networks move, and the checkpoint
    codes an image."""
    out = str(tmp_path)
    r = train("--arch", "ctx", "--rd-channels", "16,24,8", "--train-dir", photos, "--out", out, "--max-steps", "3",
              "--init", hyper_ckpt, "--entropy-only", "--lr", "1e-3", *TINY[2:])
    assert r.returncode == 0 and "transforms frozen" in r.stdout, r.stderr
    trained, ckpt = load_checkpoint(os.path.join(out, "ctx.pt"))
    source = as_stored(load_checkpoint(hyper_ckpt)[0], ckpt["precision"])  # as the shipped file stores weights
    assert ckpt["recipe"]["entropy_only"] and ckpt["step"] == 3
    for name in ("g_a.0.weight", "g_s.0.weight", "log_gain", "log_igain"):
        assert torch.equal(dict(source.named_parameters())[name], dict(trained.named_parameters())[name]), name
    assert any(p.abs().sum() > 0 for p in trained.context[0][-1].parameters())  # started at zero
    assert not torch.equal(source.h_s[0].weight, trained.h_s[0].weight)
    from codec import compress, decompress

    rgb = photo_like(48, 64, 3)
    model_id = bytes.fromhex(ckpt["model_id"])
    assert decompress(trained, model_id, compress(trained, model_id, rgb, quality=4))[0].shape == rgb.shape


def test_entropy_only_needs_an_entropy_model(photos, tmp_path):
    """The seed model has no entropy model to train alone: a one-line error, not a traceback."""
    r = train("--arch", "resnet18", "--train-dir", photos, "--out", str(tmp_path), "--max-steps", "1",
              "--entropy-only", *TINY[2:])
    assert r.returncode != 0 and "no learned entropy model" in r.stderr and "Traceback" not in r.stderr


def test_crops_travel_as_bytes_and_arrive_as_unit_floats(photos):
    """The loader hands over uint8 crops (same key, same crop); on_device makes them floats in [0, 1]."""
    from dataset import CropDataset, on_device
    from imagefiles import list_images

    data = CropDataset(list_images(photos), crop=32)
    crop = data[(3, 12345)]
    assert crop.dtype == torch.uint8 and crop.shape == (3, 32, 32) and torch.equal(crop, data[(3, 12345)])
    x = on_device(torch.stack([crop, data[0]]), "cpu")
    assert x.dtype == torch.float32 and torch.equal(x[0], crop.float() / 255.0) and 0 <= x.min() <= x.max() <= 1
    latents = torch.randn(1, 4, 2, 2)
    assert on_device(latents, "cpu") is latents  # the --entropy-only bank's float windows pass as they are


def test_entropy_lr_scale_replaces_the_models_own():
    """--entropy-lr-scale sets the entropy networks' multiple of --lr; without it the model's own stays."""
    from argparse import Namespace

    from conftest import TINY_CTX
    from train import make_optimizer

    model = build_model(TINY_CTX)

    def scales(value):
        return [g.get("lr_scale") for g in make_optimizer(model, Namespace(lr=1e-4, entropy_lr_scale=value)).param_groups]

    assert scales(None) == [None, model.ENTROPY_LR_SCALE] and scales(1.0) == [None, 1.0]


def test_top_lambda_raises_the_ceiling_from_a_checkpoint(photos, tmp_path):
    """--top-lambda with --init: the ladder keeps its lowest λ and reaches the new top; the qualities the old
    ladder covered keep their gains (re-interpolated), the new top's are extrapolated beyond them."""
    source = build_model(HyperConfig(N=8, M=8, H=4))
    source.build_tables()
    src_path = str(tmp_path / "src.pt")
    save_checkpoint(src_path, source, step=3)
    r = train("--arch", "hyper", "--rd-channels", "8,8,4", "--train-dir", photos, "--out", str(tmp_path / "hp"),
              "--max-steps", "1", "--lr", "1e-9", "--warmup", "0", "--init", src_path, "--top-lambda", "0.6", *TINY[2:])
    assert r.returncode == 0, r.stderr
    hp, _ = load_checkpoint(str(tmp_path / "hp" / "hyper.pt"))
    low = source.cfg.lambdas[0]
    assert hp.cfg.lambdas == geometric_ladder(low, 0.6, 8) and hp.cfg.lambdas[0] == low
    old_top = source.cfg.lambdas[-1]
    q = 1 + 7 * torch.log(torch.tensor(old_top / low)) / torch.log(torch.tensor(0.6 / low))
    assert torch.allclose(hp.gains(float(q))[0], source.gains(8.0)[0], rtol=1e-3)
    assert (hp.gains(8.0)[0] > source.gains(8.0)[0]).all()
    r = train("--arch", "hyper", "--train-dir", photos, "--top-lambda", "0.0001", "--out", str(tmp_path / "x"),
              "--max-steps", "1", *TINY)
    assert r.returncode != 0 and "must exceed" in r.stderr


def test_amp_on_a_cpu_needs_native_bf16(monkeypatch):
    """--amp bf16 on a CPU autocasts to bf16 where the CPU computes it natively, and is refused where PyTorch would
    emulate it (a ctx step 58× slower on an AVX2-only CPU); fp16 is CUDA's only."""
    from argparse import Namespace

    import train

    args = Namespace(amp="bf16", device="cpu")
    monkeypatch.setattr(train, "cpu_has_bf16", lambda: True)
    amp, scaler = train.mixed_precision(args)
    assert amp.device == "cpu" and amp.fast_dtype == torch.bfloat16 and amp._enabled and not scaler.is_enabled()
    monkeypatch.setattr(train, "cpu_has_bf16", lambda: False)
    with pytest.raises(SystemExit, match="no native bf16"):
        train.mixed_precision(args)
    with pytest.raises(SystemExit, match="CUDA only"):
        train.mixed_precision(Namespace(amp="fp16", device="cpu"))
    assert not train.mixed_precision(Namespace(amp="off", device="cpu"))[0]._enabled


def test_gpu_bundle_bursts_and_continues(photos, tmp_path):
    """tools/gpu_bundle.py packs code, start checkpoint and photos; burst.sh trains from the folder alone (here on
    the CPU, tiny), splits the files it leaves, and a second burst given those parts continues the run exactly."""
    start, bundle = tmp_path / "start", tmp_path / "bundle"
    tiny = ["--arch", "ctx", "--rd-channels", "8,16,4", "--crop", "32", "--batch-size", "2", "--threads", "1"]
    assert train(*tiny, "--train-dir", photos, "--out", str(start), "--max-steps", "1").returncode == 0
    flags = " ".join(tiny + ["--device", "cpu", "--val-dir", "none", "--workers", "0", "--max-steps", "2", "--ema", "0.9"])
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "gpu_bundle.py"), "--init", str(start / "ctx.pt"),
                        "--train-dir", photos, "--out", str(bundle), "--max-mb", "2", "--part-mb", "0.05",
                        "--flags", flags], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "6 of 6 photos" in r.stdout, r.stderr
    assert sorted(os.listdir(bundle)) == ["burst.sh", "code.tar.gz", "photos.npz", "start.pt"]
    burst = lambda out, *more: subprocess.run(["sh", str(bundle / "burst.sh"), str(out), *more], cwd=tmp_path,  # noqa: E731
                                              capture_output=True, text=True, timeout=300)
    r = burst(tmp_path / "o1")
    assert r.returncode == 0, r.stderr
    parts = sorted(f for f in os.listdir(tmp_path / "o1") if f.startswith("burst_resume.pt.part"))
    assert len(parts) > 1 and all(os.path.getsize(tmp_path / "o1" / f) <= 0.05 * 2**20 for f in parts)
    assert load_checkpoint(joined(tmp_path / "o1", "burst.pt"))[1]["step"] == 2
    assert load_checkpoint(joined(tmp_path / "o1", "burst_ema.pt"))[1]["step"] == 2
    for f in parts:
        (bundle / f).write_bytes((tmp_path / "o1" / f).read_bytes())
    r = burst(tmp_path / "o2", "--max-steps", "3")
    assert r.returncode == 0 and "resumed from" in r.stdout and "weight average (--ema) continued over 2 steps" in r.stdout, r.stderr
    assert load_checkpoint(joined(tmp_path / "o2", "burst.pt"))[1]["step"] == 3


def joined(folder, name):
    """The path of a file a burst left, its parts joined first when it was split."""
    parts = sorted(f for f in os.listdir(folder) if f.startswith(name + ".part"))
    if parts:
        (folder / name).write_bytes(b"".join((folder / f).read_bytes() for f in parts))
    return str(folder / name)
