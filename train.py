"""Train the seed auto-encoder or the rate–distortion model; resumable, time-budgeted, CPU-friendly.

  python train.py --arch rd --train-dir data/train --max-minutes 60
  python train.py --arch ctx --init weights/ctx.pt --rd-channels 128,192,64 --train-dir data/train --max-minutes 600
  python train.py --arch resnet101 --train-dir data/train --max-minutes 30
  python train.py ... --resume            # continue exactly where the last checkpoint stopped
"""
import argparse
import math
import os
import sys
import time
from copy import deepcopy
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from checkpoint import load_checkpoint, save_checkpoint, save_coding_checkpoint
from dataset import CropDataset, LatentBank, on_device, photo_sources, split_paths
from model import KINDS, CtxConfig, CtxModel, HyperConfig, RDConfig, SeedConfig, build_model
from models.base import geometric_ladder
from runtime import HelpFormatter, cpu_has_bf16, keep_freed_memory, resolve_device

SEED_ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101")
RD_PRESETS = {"rd": dict(N=80, M=192), "rd-small": dict(N=64, M=128), "rd-large": dict(N=128, M=192),
              "hyper": dict(N=80, M=192, H=64), "ctx": dict(N=80, M=192, H=64, spatial=64)}
CONFIGS = {"ctx": CtxConfig}  # the presets' config classes beside RDConfig / HyperConfig (those with H)
# Every other registered kind is an --arch too, sized by its config's defaults.
LEARNED_ARCHS = tuple(RD_PRESETS) + tuple(k for k in KINDS if k not in RD_PRESETS and k != "seed")


def arch_preset(arch):
    """(config class, its preset sizes) of a learned model's --arch: RD_PRESETS', or a registered kind's defaults."""
    if arch not in RD_PRESETS:
        cfg_cls = KINDS[arch][0]
        return cfg_cls, {k: getattr(cfg_cls, k) for k in ("N", "M", "H") if hasattr(cfg_cls, k)}
    channels = dict(RD_PRESETS[arch])
    return CONFIGS.get(arch, HyperConfig if "H" in channels else RDConfig), channels


def parse_args(argv=None):
    """Command-line flags; every default runs."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--arch", default="rd", choices=SEED_ARCHS + LEARNED_ARCHS,
                   help="model preset: resnet18/34/50/101 = the seed auto-encoder (resnet101 is the "
                        "seed's own), rd / rd-small / rd-large = the rate–distortion codec (factorized prior), "
                        "hyper = the same with a scale hyperprior, ctx = with a mean-scale hyperprior and "
                        "channel-wise context (start it from a hyper checkpoint with --init), resctx = ctx with residual "
                        "blocks in its transforms (start it from a ctx checkpoint with --init)")
    p.add_argument("--train-dir", default="data/train",
                   help="folder of training photos (searched recursively), or a photo pack (.npz, tools/gpu_bundle.py)")
    p.add_argument("--val-dir", default="data/val",
                   help="folder of validation photos; if missing or empty, --val-fraction of the training set is held out")
    p.add_argument("--val-fraction", type=float, default=0.02, help="share of training photos held out when there is no --val-dir")
    p.add_argument("--epochs", type=int, default=0,
                   help="passes over the training set (an epoch = --crops-per-photo crops of each photo); "
                        "0 = no limit when --max-minutes or --max-steps is set, else 100")
    p.add_argument("--crops-per-photo", type=int, default=1,
                   help="random crops of each photo per epoch (raise it on a GPU: fewer loader restarts and validations)")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many optimizer steps (0 = no limit)")
    p.add_argument("--max-minutes", type=float, default=0, help="wall-clock budget over all resumed runs (0 = no limit)")
    p.add_argument("--session-minutes", type=float, default=0,
                   help="stop this process after this many minutes, resumable (a short burst on a GPU machine); "
                        "--max-minutes still sets the learning-rate schedule over all runs (0 = no limit)")
    p.add_argument("--batch-size", type=int, default=8, help="crops per step")
    p.add_argument("--crop", type=int, default=128, help="crop side in pixels")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 1e-4 seed, 1e-3 rd)")
    p.add_argument("--min-lr-ratio", type=float, default=0.05, help="final LR as a share of the peak")
    p.add_argument("--warmup", type=int, default=200, help="linear LR warm-up steps")
    p.add_argument("--schedule", default="cosine", choices=("cosine", "wsd"),
                   help="LR after the warm-up: cosine decay over the run (--max-steps or --max-minutes), or wsd "
                        "(warm-up, stable, decay): --lr until the last --cooldown steps of --max-steps, then a linear "
                        "fall to the final LR. A run of open length at a steady LR can so be branched into a finished "
                        "one at any step: copy its resume state to a new --out, --resume there with --schedule wsd, "
                        "--lr = the LR it ran at, --max-steps = its step + --cooldown")
    p.add_argument("--cooldown", type=int, default=0, help="wsd: steps of the final linear decay (they end at --max-steps)")
    p.add_argument("--ema", type=float, default=0,
                   help="also keep an exponential moving average of the weights, this decay a step (e.g. 0.999; 0 = off): "
                        "validated each epoch beside the weights (ema_val_loss in losses.txt), written as OUT/NAME_ema.pt "
                        "and OUT/NAME_ema_best.pt, kept in the resume state")
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping (0 = off)")
    p.add_argument("--entropy-only", action="store_true",
                   help="train only the entropy model (hyperprior, context, priors) on the stored analysis output of "
                        "the frozen transforms, with the rate as the loss: g_a runs once per photo and g_s never, "
                        "so steps are many times cheaper (a first stage after --init from another kind)")
    p.add_argument("--entropy-lr-scale", type=float, default=None,
                   help=f"ctx: learning rate of the entropy networks as a multiple of --lr (default: the model's "
                        f"{CtxModel.ENTROPY_LR_SCALE:g}, for networks that start from zero; 1 for a joint fine-tune of a "
                        f"trained ctx, whose first steps that would spoil)")
    add_model_args(p.add_argument_group("model"))
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (images are cached in RAM, 0 is usually fastest)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--out", default=None,
                   help="folder for checkpoints and logs (default: runs/NAME; the shipped weights/ are never the default)")
    p.add_argument("--name", default=None, help="run name (default: the preset); files are OUT/NAME.pt, OUT/NAME_resume.pt")
    p.add_argument("--ckpt-minutes", type=float, default=5, help="also checkpoint every this many minutes")
    p.add_argument("--log-every", type=int, default=50, help="log a line every this many steps")
    p.add_argument("--resume", action="store_true", help="continue from OUT/NAME_resume.pt (weights, optimizer, step, RNG)")
    p.add_argument("--init", default=None, help="start from the weights of this checkpoint with a fresh optimizer")
    p.add_argument("--refit-prior", action="store_true",
                   help="rd model with --init: refit the entropy model to 64 training crops before training "
                        "(for checkpoints whose prior was trained differently, e.g. one density for all qualities)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (under torchrun each process takes cuda:LOCAL_RANK)")
    p.add_argument("--layout", default="auto", choices=("auto", "channels_last", "nchw"),
                   help="memory layout to train in; auto = channels_last, except hyper on a CPU (NCHW: ~10 %% faster there)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the training pass (validation stays eager): a one-off compile of about a "
                        "CPU-minute; on a 2-core x86-64 CPU resctx steps 1.18x faster, hyper in NCHW 11 %% slower")
    p.add_argument("--amp", default="off", choices=("off", "bf16", "fp16"),
                   help="mixed precision of the analysis transform (the synthesis, the entropy model and the weights stay "
                        "fp32): bf16 on a CPU with AVX-512 BF16 or AMX, or on CUDA; fp16 on CUDA only")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--notes", default=None,
                   help="words on where this run comes from (e.g. whose resume state a branch continues), stored in "
                        "every checkpoint it writes")
    return p.parse_args(argv)


def add_model_args(g):
    """The flags of one model kind or another (the preset itself is --arch)."""
    g.add_argument("--rd-channels", default=None, help="rd / hyper / ctx: override the preset's channels as N,M (hidden, latent) or, hyper and ctx, N,M,H "
                        "(+ hyper channels); with --init from a narrower model of the same M, its transforms are "
                        "embedded so the wider model starts as the same codec")
    g.add_argument("--top-lambda", type=float, default=None,
                   help="rd / hyper / ctx: λ of the highest quality (a higher ceiling); the ladder stays geometric from "
                        "the preset's lowest λ, and --init re-interpolates the gains onto it (the new top extrapolated)")
    g.add_argument("--init-transforms", default="haar", choices=("haar", "random"),
                   help="rd model, fresh runs: start the transforms as a colour + Haar wavelet codec fitted to "
                        "training crops (fast convergence) or from PyTorch's random init")
    g.add_argument("--bits", type=int, default=8, help="seed model: bits per latent value B")
    g.add_argument("--seed-noise", action="store_true",
                   help="seed model: train with the seed README's biased Gaussian noise instead of uniform noise")
    g.add_argument("--quality", type=float, default=0,
                   help="rd model: train only this quality (1…8); 0 = all qualities at once (one model, every rate)")
    g.add_argument("--perceptual-weight", type=float, default=0.0,
                   help="seed model: weight of the VGG-19 perceptual loss; needs --vgg-weights")
    g.add_argument("--vgg-weights", default=None, help="local torchvision VGG-19 state_dict for the perceptual loss")
    g.add_argument("--pretrained", default=None, help="seed model: local torchvision ResNet state_dict to initialise the trunk")


def make_model(args):
    """Fresh model for the chosen preset."""
    if args.arch in SEED_ARCHS:
        if args.top_lambda is not None:
            sys.exit("error: --top-lambda: the seed model has no quality ladder (its rate is set by --bits)")
        model = build_model(SeedConfig(arch=args.arch, bits=args.bits))
        if args.pretrained:
            model.load_pretrained_trunk(args.pretrained)
            print(f"encoder trunk initialised from {args.pretrained}")
        else:
            print("encoder trunk randomly initialised (no --pretrained file given; nothing is downloaded)")
        return model
    cfg_cls, channels = arch_preset(args.arch)
    if args.rd_channels:
        channels.update(zip("NMH" if "H" in channels else "NM", (int(c) for c in args.rd_channels.split(","))))
    if issubclass(cfg_cls, CtxConfig) and channels["M"] != cfg_cls.M:
        # The preset's slices in proportion (1 : 1 : 2 : 4 : 4 of M), so --rd-channels works for ctx too.
        parts = [s * channels["M"] // cfg_cls.M for s in cfg_cls.slices]
        channels["slices"] = tuple(parts[:-1]) + (channels["M"] - sum(parts[:-1]),)
    if args.top_lambda is not None:
        preset = cfg_cls().lambdas
        try:
            channels["lambdas"] = geometric_ladder(preset[0], args.top_lambda, len(preset))
        except ValueError as e:
            sys.exit(f"error: --top-lambda {args.top_lambda}: {e}")
    try:
        cfg = cfg_cls(**channels)
        if args.quality:
            lam = float(build_model(cfg).lmbda(args.quality))
            cfg = replace(cfg, lambdas=(lam, lam))
        return build_model(cfg)
    except ValueError as e:
        sys.exit(f"error: --rd-channels {args.rd_channels}: {e}")


def photos(n):
    """ "1 photo", "2 photos"."""
    return f"{n} photo{'s' * (n != 1)}"


def make_data(args):
    """Training and validation datasets, with a clear error when the folders are empty."""
    train_paths = photo_sources(args.train_dir)
    if not train_paths:
        sys.exit(f"error: no training images in {args.train_dir!r}. Put photos (PNG/JPEG) there, e.g.\n"
                 f"  mkdir -p data && cp -r /path/to/photos data/train\n"
                 f"or pass --train-dir DIR (or a photo pack, tools/gpu_bundle.py).")
    val_paths = photo_sources(args.val_dir)
    if not val_paths:
        train_paths, val_paths = split_paths(train_paths, args.val_fraction, args.seed)
        val_paths = val_paths or train_paths[:1]
        print(f"no images in {args.val_dir!r}: holding out {photos(len(val_paths))} of the training set for validation")
    print(f"loading {photos(len(train_paths))} for training and {photos(len(val_paths))} for validation into RAM …")
    train = CropDataset(train_paths, args.crop)
    val = CropDataset(val_paths, args.crop)
    if len(train) * args.crops_per_photo < args.batch_size:
        sys.exit(f"error: {len(train)} usable training photos × {args.crops_per_photo} crops is fewer than one batch "
                 f"(--batch-size {args.batch_size})")
    return train, val


def vgg_loss_fn(args, device):
    """L1 distance of VGG-19 features[:36] (the seed's perceptual loss), or None when off."""
    if args.perceptual_weight <= 0:
        if args.vgg_weights is None and args.arch in SEED_ARCHS:
            print("perceptual loss off (weight 0; a VGG needs a local --vgg-weights file)")
        return None
    if args.vgg_weights is None:
        sys.exit("error: --perceptual-weight > 0 needs --vgg-weights PATH (a local torchvision VGG-19 "
                 "state_dict); a randomly initialised VGG would be meaningless, and nothing is downloaded")
    import torchvision

    vgg = torchvision.models.vgg19(weights=None)
    vgg.load_state_dict(torch.load(args.vgg_weights, map_location="cpu", weights_only=True))
    feats = vgg.features[:36].to(device).eval().requires_grad_(False)
    mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1)
    return lambda a, b: F.l1_loss(feats((a - mean) / std), feats((b - mean) / std))


def compute_loss(model, x, out, quality, vgg, args):
    """The model's training objective and its parts, plus the VGG perceptual term when one is loaded."""
    loss, parts = model.loss(x, out, quality)
    if vgg is not None:
        loss = loss + args.perceptual_weight * vgg(out["x_hat"], x)
    return loss, parts


def steps_per_epoch(dataset, args):
    """Optimizer steps in one epoch (--crops-per-photo crops of every photo, whole batches only)."""
    return len(dataset) * args.crops_per_photo // args.batch_size


def epoch_loader(dataset, state, args, rank=0, world=1):
    """This process's share of the current epoch's batches, in an order fixed by (seed, epoch).

    Batches already done (a resumed run) are skipped; each item is (image index, crop seed).
    """
    g = torch.Generator().manual_seed(args.seed * 1_000_003 + state["epoch"])
    order = (torch.randperm(len(dataset) * args.crops_per_photo, generator=g) % len(dataset)).tolist()
    local = args.batch_size // world
    keys = []
    for b in range(state["epoch_step"], steps_per_epoch(dataset, args)):
        for pos in range(b * args.batch_size + rank * local, b * args.batch_size + (rank + 1) * local):
            keys.append((order[pos], int(np.random.SeedSequence([args.seed, state["epoch"], pos]).generate_state(1)[0])))
    return DataLoader(KeyedItems(dataset, keys), batch_size=local, shuffle=False, num_workers=args.workers,
                      pin_memory=args.device.startswith("cuda"))  # pinned pages: the copy overlaps the step


class KeyedItems(torch.utils.data.Dataset):
    """A list of (index, seed) keys of a CropDataset, yielding (crop, seed)."""

    def __init__(self, dataset, keys):
        self.dataset, self.keys = dataset, keys

    def __len__(self):
        return len(self.keys)

    def __getitem__(self, i):
        return self.dataset[self.keys[i]], self.keys[i][1]


def lr_at(step, progress, args):
    """Linear warm-up, then cosine decay driven by progress in [0, 1] (steps or minutes), or wsd's plateau and
    linear cool-down over the last --cooldown steps."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    if args.schedule == "wsd":
        fall = min(max(step + 1 - (args.max_steps - args.cooldown), 0) / args.cooldown, 1.0)
        return args.lr * (1 - (1 - args.min_lr_ratio) * fall)
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


@torch.no_grad()
def validate(model, val, vgg, args):
    """Mean validation loss and parts, with real rounding (eval mode), at a few fixed qualities."""
    model.eval()
    x = on_device(torch.stack([val[i] for i in range(len(val))]), args.device)
    qualities, totals = model.validation_qualities(), {}
    for q in qualities:
        quality = None if q is None else torch.full((len(x),), q)
        out = model.evaluate(x, quality)
        loss, parts = compute_loss(model, x, out, quality, vgg, args)
        for k, v in {"loss": loss.item(), **parts}.items():
            totals[k] = totals.get(k, 0) + v / len(qualities)
    model.train()
    return totals


def lineage(ckpt, path):
    """The training stages that made a checkpoint: its own history, or one stage built from its recipe."""
    if ckpt.get("history"):
        return list(ckpt["history"])
    return [{"stage": 1, "steps": ckpt.get("step"), "init": "unknown", "recipe": ckpt.get("recipe"), "file": path}]


def this_stage(model, state, args, recipe):
    """History entry of the current run (so an --init chain keeps every stage that led to a checkpoint)."""
    where = (torch.cuda.get_device_name(args.device) if args.device.startswith("cuda")
             else f"CPU, {torch.get_num_threads()} threads")
    return {"stage": len(state["earlier_stages"]) + 1, "where": where, "steps": state["step"],
            "minutes": round(state["elapsed"] / 60, 1), "init": args.init or "fresh",
            "lambdas": list(getattr(model.cfg, "lambdas", ())), "recipe": recipe}


def self_description(model, state, args):
    """What a checkpoint of this run records about itself: recipe, history of every stage, total steps."""
    recipe = {k: v for k, v in vars(args).items() if k not in ("resume",)}
    history = state["earlier_stages"] + [this_stage(model, state, args, recipe)]
    return {"recipe": recipe, "history": history, **({"notes": args.notes} if args.notes else {}),
            "total_steps": sum(h["steps"] for h in history if isinstance(h.get("steps"), int))}


def save_shippable(path, model, state, args):
    """The checkpoint a user codes with (no optimizer): the weights at the model's SHIP_PRECISION and the tables
    built from those rounded weights (the training run keeps its fp32 weights), written atomically."""
    shipped = {k: v for k, v in state.items() if k != "earlier_stages"}
    save_coding_checkpoint(path, model, model.SHIP_PRECISION, **self_description(model, state, args), **shipped)


def save_all(run, state, args):
    """Atomically write the resume state (weights + optimizer + RNG + average) and the shippable checkpoint(s)."""
    save_shippable(os.path.join(args.out, f"{args.name}.pt"), run.model, state, args)
    average = {}
    if run.ema is not None:
        save_shippable(os.path.join(args.out, f"{args.name}_ema.pt"), run.ema.module, state, args)
        average = {"ema": {"n": run.ema.n, "decay": args.ema,
                           "params": {k: v.detach().cpu() for k, v in run.ema.module.named_parameters()}}}
    save_checkpoint(os.path.join(args.out, f"{args.name}_resume.pt"), run.model, optimizer=run.opt.state_dict(),
                    torch_rng=torch.get_rng_state(), **self_description(run.model, state, args), **state, **average)


class WeightAverage:
    """Exponential moving average of a model's parameters, kept in a copy of the model. Parameters only: the copy's
    entropy tables are rebuilt from its own weights when it is validated or saved (their sizes change as they are)."""

    def __init__(self, model, decay):
        self.module, self.decay, self.n = deepcopy(model), decay, 0

    @torch.no_grad()
    def update_parameters(self, model):
        """Move the average towards the model's current weights (the first call copies them)."""
        for mine, theirs in zip(self.module.parameters(), model.parameters()):
            mine.lerp_(theirs, 1.0 if self.n == 0 else 1 - self.decay)
        self.n += 1


def make_ema(model, args):
    """--ema: the moving average of the weights (parameters only: the entropy tables are rebuilt from them), continued
    from the resume state when it holds one, else started at the current weights."""
    if not args.ema:
        return None
    ema = WeightAverage(model, args.ema)
    path = os.path.join(args.out, f"{args.name}_resume.pt")
    saved = load_checkpoint(path)[1].get("ema") if args.resume and os.path.exists(path) else None
    if saved:
        with torch.no_grad():
            for k, p in ema.module.named_parameters():
                p.copy_(saved["params"][k])
        ema.n = saved["n"]
        print(f"weight average (--ema) continued over {saved['n']} steps (decay {saved['decay']:g})")
    return ema


def setup_distributed(args):
    """(rank, world size); joins the process group when launched by torchrun (NCCL on GPUs, else Gloo)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch.distributed as dist

    backend = "nccl" if args.device.startswith("cuda") else "gloo"
    dist.init_process_group(backend)
    if args.device.startswith("cuda"):
        args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(args.device)
    if args.batch_size % world:
        sys.exit(f"error: --batch-size {args.batch_size} (the global batch) must be divisible by the {world} processes")
    return dist.get_rank(), world


def synced(values, rank, world):
    """Global mean of values[0] and rank 0's values[1:], identical on every process (one all-reduce)."""
    if world == 1:
        return values
    import torch.distributed as dist

    t = torch.tensor([values[0] / world] + [v if rank == 0 else 0.0 for v in values[1:]], dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def make_optimizer(model, args):
    """Adam over the model's parameter groups; --entropy-lr-scale replaces the scale of the groups that have one."""
    groups = model.param_groups()
    if args.entropy_lr_scale is not None:
        for group in groups:
            if "lr_scale" in group:
                group["lr_scale"] = args.entropy_lr_scale
    return torch.optim.Adam(groups, lr=args.lr)


def resume_or_init(model, opt, state, args):
    """Load the resume state (--resume) or starting weights (--init); returns (model, optimizer, state)."""
    resume_path = os.path.join(args.out, f"{args.name}_resume.pt")
    if args.resume and os.path.exists(resume_path):
        model, ckpt = load_checkpoint(resume_path, args.device)
        opt = make_optimizer(model, args)
        opt.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["torch_rng"])
        state = {k: ckpt.get(k, v) for k, v in state.items()}
        print(f"resumed from {resume_path} at step {state['step']} (epoch {state['epoch']})")
    elif args.resume:
        print(f"no {resume_path} yet: starting fresh")
    elif args.init:
        source, ckpt = load_checkpoint(args.init, args.device)
        if asdict(source.cfg) == asdict(model.cfg):
            model = source
        else:
            print(f"{args.init} is a {ckpt['kind']!r} model with another config: copying the weights that fit "
                  f"the new {model.cfg.kind!r} model")
            skipped = model.adopt(source)
            if skipped:
                print(f"not copied (shape differs): {', '.join(skipped)}")
            if ckpt["kind"] == model.cfg.kind:
                model.build_tables()  # its own entropy model came along: only the tables are to rebuild
        opt = make_optimizer(model, args)
        state["earlier_stages"] = lineage(ckpt, args.init)
        print(f"initialised from {args.init} (step {ckpt.get('step', '?')}), fresh optimizer")
    return model, opt, state


@dataclass
class Run:
    """What every step of one training run uses (plain container)."""

    model: torch.nn.Module
    net: torch.nn.Module  # the model, or its DDP wrapper
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    amp: torch.autocast
    vgg: object
    rank: int
    world: int
    log_path: str
    layout: torch.memory_format  # of the model and every batch, chosen once by training_layout
    forward_kwargs: dict  # extra arguments of every training pass (the seed's --seed-noise)
    ema: object = None  # WeightAverage of `model` (--ema), rank 0 only


def setup(args):
    """Device, process group, data, model (fresh, resumed or initialised), optimizer; returns (Run, state, data)."""
    args.name = args.name or (f"seed_{args.arch}" if args.arch in SEED_ARCHS else args.arch)
    args.out = args.out or os.path.join("runs", args.name)
    args.epochs = args.epochs or (10**9 if args.max_minutes or args.max_steps or args.session_minutes else 100)  # a budget alone decides
    if args.schedule == "wsd" and not 0 < args.cooldown <= args.max_steps:
        sys.exit("error: --schedule wsd needs --max-steps and a --cooldown of 1 … --max-steps steps")
    if args.cooldown and args.schedule != "wsd":
        sys.exit("error: --cooldown applies to --schedule wsd only (the cosine schedule decays over the whole run)")
    if args.ema and not 0 < args.ema < 1:
        sys.exit(f"error: --ema {args.ema:g}: the decay is a share of the average kept each step, between 0 and 1")
    if args.seed_noise and args.arch not in SEED_ARCHS:
        sys.exit("error: --seed-noise applies to the seed models (resnet18/34/50/101) only")
    args.lr = args.lr or (1e-4 if args.arch in SEED_ARCHS else 1e-3)
    keep_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        resolve_device(args.device)
    except ValueError as e:
        sys.exit(f"error: {e}")
    rank, world = setup_distributed(args)
    if args.device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True  # one crop size throughout: let cuDNN time and pick its kernels
    if rank:
        sys.stdout = open(os.devnull, "w")  # only rank 0 talks, logs and writes files
    torch.manual_seed(args.seed)
    vgg = vgg_loss_fn(args, args.device)  # before loading photos: a missing VGG file fails fast
    train_set, val_set = make_data(args)
    model = make_model(args).to(args.device)
    opt = make_optimizer(model, args)
    state = {"step": 0, "epoch": 0, "epoch_step": 0, "elapsed": 0.0, "cpu": 0.0, "loss_ema": 0.0, "skipped": 0, "best_val": math.inf,
             "ema_best_val": math.inf, "earlier_stages": []}
    model, opt, state = resume_or_init(model, opt, state, args)
    start_model(model, state, args, train_set)
    if args.entropy_only:
        train_set = latent_bank(model, train_set, args)
    layout = training_layout(args)
    model = model.to(memory_format=layout).train()
    # Buffers are not broadcast: rank 0 alone rebuilds the entropy tables when it saves.
    net = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False) if world > 1 else model
    net = torch.compile(net) if args.compile else net  # checkpoints and validation use `model`, uncompiled
    amp, scaler = mixed_precision(args)
    os.makedirs(args.out, exist_ok=True)
    log_path = os.path.join(args.out, f"{args.name}_log.csv")
    if rank == 0 and not os.path.exists(log_path):
        with open(log_path, "w") as f:
            f.write("step,epoch,minutes,lr,loss,mse,psnr,bpp,samples_per_s,cpu_minutes\n")
    run = Run(model, net, opt, scaler, amp, vgg, rank, world, log_path, layout,
              {"mode": "seed_noise"} if args.seed_noise else {}, make_ema(model, args) if rank == 0 else None)
    return run, state, train_set, val_set


def mixed_precision(args):
    """(autocast context, gradient scaler) for --amp; fp16 needs a scaler and CUDA, bf16 neither."""
    device = "cuda" if args.device.startswith("cuda") else "cpu"
    if args.amp == "fp16" and device == "cpu":
        sys.exit("error: --amp fp16 runs on CUDA only; on a CPU use --amp bf16")
    if args.amp == "bf16" and device == "cpu" and not cpu_has_bf16():
        sys.exit("error: --amp bf16: this CPU has no native bf16 (AVX-512 BF16 or AMX), so PyTorch would emulate it "
                 "at a small fraction of fp32's speed; train in fp32 (--amp off)")
    amp = torch.autocast(device, dtype=torch.float16 if args.amp == "fp16" else torch.bfloat16, enabled=args.amp != "off")
    return amp, torch.amp.GradScaler(device, enabled=args.amp == "fp16")


def start_model(model, state, args, train_set):
    """A fresh run: the model's own initialisation; an --init run: fit the entropy model when it has none."""
    crops = lambda: on_device(torch.stack([train_set[i] for i in range(min(64, len(train_set)))]), args.device)  # noqa: E731
    if state["step"] == 0 and not args.init and args.init_transforms == "haar":
        done = model.initialise(crops())
        if done:
            print(done)
    elif state["step"] == 0 and args.init and (args.refit_prior or not model.has_tables()):
        # A model initialised from another kind (rd → hyper) has no entropy model of its own yet.
        done = model.refit(crops())
        if done:
            print(done)


def latent_bank(model, train_set, args):
    """Freeze the transforms and store the analysis output of every training photo (--entropy-only)."""
    try:
        model.freeze_transforms()
    except ValueError as e:
        sys.exit(f"error: --entropy-only: {e}")
    if args.crop % model.stride:
        sys.exit(f"error: --entropy-only needs --crop to be a multiple of the model's stride {model.stride}")
    print(f"--entropy-only: transforms frozen; analysing {photos(len(train_set))} once …")
    analyse = lambda x: model.analyse(x.to(args.device))  # noqa: E731
    progress = lambda items: tqdm(items, desc="analysis", leave=False, dynamic_ncols=True)  # noqa: E731
    return LatentBank(train_set, analyse, args.crop // model.stride, progress)


def training_layout(args):
    """Memory layout of the training tensors: --layout, or for auto what measured fastest (2-core CPU:
    hyper's 4 × 256² crops 4.8 vs 4.35 samples/s in NCHW, where oneDNN's weight gradients of the large
    5×5 stride-2 maps are slow in channels_last; rd's 8 × 128² 16.5 vs 15.4 in channels_last)."""
    layout = args.layout
    if layout == "auto":
        hyperprior = args.arch not in SEED_ARCHS and "H" in arch_preset(args.arch)[1]
        layout = "nchw" if hyperprior and not args.device.startswith("cuda") else "channels_last"
    return torch.channels_last if layout == "channels_last" else torch.contiguous_format


def train_step(run, x, seeds, state, args, start, start_cpu):
    """One optimizer step on a batch; returns (loss, parts), or None when the batch was a loss spike."""
    x = on_device(x, args.device).contiguous(memory_format=run.layout)
    quality, noise = run.model.draw_randomness(seeds, args.crop)
    with run.amp:
        forward = run.model.entropy_forward if args.entropy_only else run.net
        out = forward(x, quality, None if noise is None else noise.to(args.device), **run.forward_kwargs)
        loss, parts = compute_loss(run.model, x, out, quality, run.vgg, args)
    loss_value, state["elapsed"] = synced([loss.item(), time.time() - start], run.rank, run.world)
    # CPU time of this process (all its threads): on a shared machine it, not wall time, compares runs
    state["cpu"] = start_cpu + time.process_time()
    ema = state["loss_ema"] or loss_value
    state["epoch_step"] += 1
    if not math.isfinite(loss_value) or loss_value > 50 * ema:
        state["skipped"] += 1  # a loss spike: skip this batch rather than wreck the weights
        return None
    state["loss_ema"] = 0.98 * ema + 0.02 * loss_value
    run.opt.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    if args.clip:
        run.scaler.unscale_(run.opt)
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), args.clip)
    run.scaler.step(run.opt)
    run.scaler.update()
    if run.ema is not None:
        run.ema.update_parameters(run.model)
    state["step"] += 1
    return loss_value, parts


def write_log_line(path, state, lr, window, seconds, batch_size):
    """Append the means of the steps since the last line (window holds their sums and count n)."""
    mean = {k: v / window["n"] for k, v in window.items()}
    with open(path, "a") as f:
        f.write(f"{state['step']},{state['epoch']},{state['elapsed'] / 60:.2f},{lr:.3g},{mean['loss']:.5f},"
                f"{mean.get('mse', 0):.6f},{mean.get('psnr', 0):.3f},{mean.get('bpp', 0):.4f},{window['n'] * batch_size / seconds:.1f},"
                f"{state.get('cpu', 0) / 60:.2f}\n")


def main(argv=None):
    """Train until the epoch, step or time budget is used up, checkpointing on the way."""
    args = parse_args(argv)
    run, state, train_set, val_set = setup(args)
    print(f"training {args.name}: global batch {args.batch_size} on {run.world} process(es), peak LR {args.lr}")
    start, last_ckpt, budget = time.time() - state["elapsed"], time.time(), args.max_minutes * 60
    start_cpu = state.setdefault("cpu", 0.0) - time.process_time()  # resume states older than the CPU clock lack it
    done, window, t_log = False, {}, time.time()  # window: sums of the steps since the last log line
    session_end = time.time() + args.session_minutes * 60 if args.session_minutes else math.inf
    while state["epoch"] < args.epochs and not done:
        sums = {}
        loader = epoch_loader(train_set, state, args, run.rank, run.world)
        bar = tqdm(loader, desc=f"epoch {state['epoch'] + 1}", leave=False, dynamic_ncols=True, disable=run.rank > 0)
        for x, seeds in bar:
            progress = max(state["step"] / args.max_steps if args.max_steps else 0,
                           state["elapsed"] / budget if budget else 0, state["epoch"] / args.epochs)
            lr = lr_at(state["step"], progress, args)
            for group in run.opt.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            result = train_step(run, x, seeds, state, args, start, start_cpu)
            if result is None:
                continue
            if state["step"] == 20 and budget and run.rank == 0:
                check_warmup(state, args, budget)
            for k, v in {"loss": result[0], **result[1], "n": 1}.items():
                sums[k] = sums.get(k, 0) + v
                window[k] = window.get(k, 0) + v
            left = f"{max(budget - state['elapsed'], 0) / 60:.0f} min" if budget else None
            bar.set_postfix({k: f"{v:.4g}" for k, v in result[1].items() if k in ("psnr", "bpp")}, loss=f"{result[0]:.4f}",
                            **({"budget left": left} if left else {}))
            if run.rank == 0 and state["step"] % args.log_every == 0:
                write_log_line(run.log_path, state, lr, window, time.time() - t_log, args.batch_size)
                window, t_log = {}, time.time()
            if (args.max_steps and state["step"] >= args.max_steps) or (budget and state["elapsed"] >= budget) \
                    or time.time() >= session_end:
                done = True
                break
            if run.rank == 0 and time.time() - last_ckpt > args.ckpt_minutes * 60:
                save_all(run, state, args)
                last_ckpt = time.time()
        if done and state["epoch_step"] < steps_per_epoch(train_set, args):
            break  # a partial epoch is not logged as an epoch
        state["epoch"], state["epoch_step"] = state["epoch"] + 1, 0
        if run.rank == 0:
            end_of_epoch(run, state, args, val_set, sums)
            last_ckpt = time.time() if state["epoch"] % 5 == 0 else last_ckpt
    finish(run, state, args, time.time() >= session_end)


def check_warmup(state, args, budget):
    """Say so when the warm-up would take much of the steps the time budget allows at the speed so far."""
    expected = state["step"] * budget / max(state["elapsed"], 1e-9)
    if args.warmup > expected / 4:
        print(f"warning: --warmup {args.warmup} is {100 * args.warmup / expected:.0f} % of the ~{expected:.0f} steps "
              f"--max-minutes {args.max_minutes:g} allows at this speed; the learning rate would barely leave the "
              f"warm-up (lower --warmup, e.g. to {max(1, int(expected / 20))})")


def stop_reason(state, args, session_over=False):
    """Why the run ended, in words (and whether its learning-rate schedule finished)."""
    if session_over:
        return f"--session-minutes {args.session_minutes:g} used (continue with --resume)"
    if args.max_steps and state["step"] >= args.max_steps:
        return f"--max-steps {args.max_steps} reached"
    if args.max_minutes and state["elapsed"] >= args.max_minutes * 60:
        return f"--max-minutes {args.max_minutes:g} used"
    left = f" with {args.max_minutes - state['elapsed'] / 60:.1f} of its {args.max_minutes:g} minutes left" if args.max_minutes else ""
    return f"--epochs {args.epochs} done{left}" + ("; the learning-rate schedule did not finish" if left else "")


def finish(run, state, args, session_over=False):
    """Final checkpoint (rank 0), why the run stopped, and leaving the process group."""
    if run.rank == 0:
        save_all(run, state, args)
        print(f"stopped: {stop_reason(state, args, session_over)}; saved {os.path.join(args.out, args.name)}.pt at step {state['step']} "
              f"({state['elapsed'] / 60:.1f} min in all, {state['skipped']} spiking batches skipped)")
        if math.isfinite(state["best_val"]):
            print(f"best validation loss {state['best_val']:.5f}: {os.path.join(args.out, args.name)}_best.pt")
    if run.world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()


def end_of_epoch(run, state, args, val_set, sums):
    """Validate the weights (and their --ema average), append to losses.txt, keep the best checkpoint of each by
    validation loss, checkpoint every 5 epochs."""
    val = validate(run.model, val_set, run.vgg, args)
    averaged = validate(run.ema.module, val_set, run.vgg, args) if run.ema is not None else None
    train_loss = sums.get("loss", 0) / max(sums.get("n", 0), 1)
    with open(os.path.join(args.out, "losses.txt"), "a") as f:
        f.write(f"{args.name} epoch {state['epoch']} step {state['step']} train_loss {train_loss:.6f} {scores('val', val)}"
                f" minutes {state['elapsed'] / 60:.1f} cpu_minutes {state.get('cpu', 0) / 60:.1f}"
                + (f" {scores('ema_val', averaged)}" if averaged else "") + "\n")
    qualities = ", ".join("the seed's rate" if q is None else f"{q:g}" for q in run.model.validation_qualities())
    print(f"epoch {state['epoch']} step {state['step']}: train loss {train_loss:.5f}; validation (mean over quality "
          f"{qualities}): loss {val['loss']:.5f}, PSNR {val['psnr']:.2f} dB" + (f", bpp {val['bpp']:.3f}" if "bpp" in val else "")
          + (f"; weight average: loss {averaged['loss']:.5f}, PSNR {averaged['psnr']:.2f} dB" if averaged else ""))
    keep_best(run.model, val, "best_val", "best", state, args)
    if averaged:
        keep_best(run.ema.module, averaged, "ema_best_val", "ema_best", state, args)
    if state["epoch"] % 5 == 0:
        save_all(run, state, args)


def scores(prefix, val):
    """A losses.txt fragment of one validation: loss, PSNR and (learned models) bpp, each named with prefix."""
    return (f"{prefix}_loss {val['loss']:.6f} {prefix}_psnr {val['psnr']:.3f}"
            + (f" {prefix}_bpp {val['bpp']:.4f}" if "bpp" in val else ""))


def keep_best(model, val, key, suffix, state, args):
    """Write OUT/NAME_<suffix>.pt when this validation beats state[key]: the run keeps its best weights, whatever
    later epochs do."""
    if val["loss"] < state[key]:
        state[key] = val["loss"]
        save_shippable(os.path.join(args.out, f"{args.name}_{suffix}.pt"), model, state, args)


if __name__ == "__main__":
    main()
