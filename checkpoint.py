"""Checkpoint files: one self-describing file per model `{kind, config, model, model_id, ...}`.

`load_checkpoint` rebuilds the model from the file alone; weights are stored as fp32, fp16 or int8
with a per-channel scale (`pack_state`).
"""
import hashlib
import os
from copy import deepcopy
from dataclasses import asdict

import torch

from imagefiles import atomic_write
from model import build_model

# The shipped checkpoints, found from the repository wherever a command is started.
WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
DEFAULT_WEIGHTS = os.path.join(WEIGHTS_DIR, "resctx4.pt")


def model_id(state_dict):
    """Short identity of a set of weights (and tables): first 4 bytes of a SHA-256 over all tensors."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(t.to(torch.float32).numpy().tobytes() if t.is_floating_point() else t.numpy().tobytes())
    return h.digest()[:4]


INT8_SCALE = ".int8_scale"  # suffix of the per-channel scale stored beside an int8 weight


def pack_state(state, precision="fp32"):
    """Weights as stored in a file: fp32, fp16, or int8 with an fp16 scale per output channel.

    int8 applies to weight tensors of 4096+ values (convolutions); the rest stays fp16. It halves the
    ResNet seed checkpoint again (fp16 would exceed 100 MB) for a loss the README reports.
    """
    out = {}
    for k, v in state.items():
        if not v.is_floating_point() or precision == "fp32":
            out[k] = v
        elif precision == "int8" and v.dim() >= 2 and v.numel() >= 4096:
            scale = v.abs().amax(dim=tuple(range(1, v.dim())), keepdim=True).clamp_min(1e-12) / 127
            out[k] = torch.round(v / scale).to(torch.int8)
            out[k + INT8_SCALE] = scale.half()
        else:
            out[k] = v.half()
    return out


def unpack_state(state):
    """Inverse of pack_state: every floating tensor (and int8 weight) back to float32."""
    out = {}
    for k, v in state.items():
        if k.endswith(INT8_SCALE):
            continue
        if v.dtype == torch.int8 and k + INT8_SCALE in state:
            out[k] = v.float() * state[k + INT8_SCALE].float()
        else:
            out[k] = v.float() if v.is_floating_point() else v
    return out


def as_stored(model, precision):
    """A copy of the model whose weights are what a checkpoint at `precision` holds (rounded as pack_state
    rounds them), for building the entropy tables from the weights a user will code with."""
    copy = deepcopy(model)
    rounded = unpack_state(pack_state({k: v.detach().cpu() for k, v in model.state_dict().items()}, precision))
    copy.load_state_dict(rounded)
    return copy


def save_checkpoint(path, model, precision="fp32", **extra):
    """Write {kind, config, model, model_id, **extra} atomically (never a half-written file)."""
    state = pack_state({k: v.detach().cpu() for k, v in model.state_dict().items()}, precision)
    ckpt = {"kind": model.cfg.kind, "config": asdict(model.cfg), "model": state, "precision": precision,
            "model_id": model_id(state).hex(), **extra}
    atomic_write(path, lambda f: torch.save(ckpt, f))


def save_coding_checkpoint(path, model, precision, **extra):
    """Write the checkpoint a user codes with: the weights rounded to `precision` and the entropy tables built
    from those rounded weights (the model passed in keeps its own weights)."""
    stored = as_stored(model, precision)
    stored.build_tables()
    save_checkpoint(path, stored, precision=precision, **extra)


def load_checkpoint(path, device="cpu"):
    """Rebuild the model from a checkpoint file alone; returns (model in eval mode, checkpoint dict)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:
        raise ValueError(f"{path}: not a readable checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or "config" not in ckpt or "model" not in ckpt:
        raise ValueError(f"{path}: not a checkpoint of this project (no config / model)")
    model = checked_model(ckpt, path)
    if ckpt["config"]["kind"] == "rd" and "prior.starts" not in ckpt["model"]:  # one shared table (old layout): rebuild
        ckpt["model"] = {k: v for k, v in ckpt["model"].items() if k.split(".")[-1] not in ("freqs", "offsets", "lengths")}
    # Entropy tables are empty buffers until built; size them to what the file holds.
    for name, buf in list(model.named_buffers()):
        owner, _, attr = name.rpartition(".")
        if name in ckpt["model"] and buf.numel() == 0:
            setattr(model.get_submodule(owner), attr, torch.zeros_like(ckpt["model"][name]))
    state = unpack_state(ckpt["model"])
    state.update({k: v for k, v in model.named_buffers() if k not in state})  # tables not built yet
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{path}: weights do not fit the config ({str(e).splitlines()[0]})") from None
    return model.to(device).eval(), ckpt


def checked_model(ckpt, path):
    """The model a checkpoint describes, built only after its config proved to describe the file's own tensors
    (so a tiny file cannot make the loader allocate a huge model) and its identity proved to be theirs (so a
    planted file cannot answer for another model's files); ValueError naming what is wrong."""
    config, state = ckpt["config"], ckpt["model"]
    if not isinstance(config, dict) or not isinstance(state, dict) \
            or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ValueError(f"{path}: not a checkpoint of this project (config / model of the wrong type)")
    try:
        with torch.device("meta"):  # shapes only: nothing is allocated
            shapes = {k: tuple(v.shape) for k, v in build_model(config).state_dict().items() if v.numel()}
    except Exception as e:
        raise ValueError(f"{path}: its config does not describe a model ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else 'invalid values'})") from None
    wrong = [k for k, shape in shapes.items() if k not in state or tuple(state[k].shape) != shape]
    if wrong:
        raise ValueError(f"{path}: weights do not fit the config ({len(wrong)} tensors missing or of another shape, "
                         f"e.g. {wrong[0]})")
    identity = model_id(state).hex()
    if ckpt.setdefault("model_id", identity) != identity:
        raise ValueError(f"{path}: its stated identity {ckpt['model_id']} is not that of its weights ({identity})")
    return build_model(config)


def find_checkpoint(model_id, folder=WEIGHTS_DIR):
    """Path of the checkpoint in a folder whose identity (hex) is model_id; LookupError naming both if none."""
    names = sorted(f for f in os.listdir(folder) if f.endswith(".pt")) if os.path.isdir(folder) else []
    for name in names:
        path = os.path.join(folder, name)
        try:  # mmap: reading the identity of a 50 MB checkpoint costs no more than a small one's
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:
            continue
        if isinstance(ckpt, dict) and ckpt.get("model_id") == model_id:
            return path
    raise LookupError(f"no checkpoint in {folder}/ has the identity {model_id} that made this file (pass --weights; "
                      f"weights the repository shipped before are in its history: git log -- weights/)")
