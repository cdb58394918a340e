"""Shared fixtures: tiny untrained models saved as real checkpoints, and small test images."""
import os
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from checkpoint import save_checkpoint  # noqa: E402
from model import CtxConfig, HyperConfig, RDConfig, SeedConfig, build_model  # noqa: E402
from models.residual import ResCtxConfig  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Parallel test processes (pytest -n): one thread each, and for the scripts they start, so the
    # processes share the cores instead of oversubscribing them (tests of thread counts set their own).
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

TINY_RD = RDConfig(N=16, M=24)
TINY_HYPER = HyperConfig(N=16, M=24, H=8)
TINY_CTX = CtxConfig(N=16, M=24, H=8, slices=(4, 8, 12), context=16, spatial=8)  # with a checkerboard
TINY_CTX_PLAIN = CtxConfig(N=16, M=24, H=8, slices=(4, 8, 12), context=16)  # channel context only
TINY_RESCTX = ResCtxConfig(N=16, M=24, H=8, slices=(4, 8, 12), context=16, spatial=8, blocks=(0, 1, 1))
TINY_SEED = SeedConfig(arch="resnet18", latent_channels=32, decoder_channels=(32, 16, 16, 8, 8))


def photo_like(h, w, seed=0):
    """A smooth random colour image with some texture (uint8 RGB)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack([np.sin(6 * xx + c) * np.cos(4 * yy - c) for c in range(3)], -1) * 90 + 128
    return np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)


def tiny_checkpoint(folder, config, name):
    """Save a tiny untrained model of config (seeded) with its integer tables built; returns the path."""
    torch.manual_seed(0)
    model = build_model(config).eval()
    for net in [*getattr(model, "context", ()), *getattr(model, "spatial", ())]:  # they start at zero: give them something to say
        torch.nn.init.normal_(net[-1].weight, 0, 0.1)
    model.build_tables()
    path = str(folder / name)
    save_checkpoint(path, model, step=0)
    return path


def tiny_fixture(config, name, doc):
    """A session fixture: the path of a tiny untrained checkpoint of config, saved once per test process."""

    def fixture(tmp_path_factory):
        return tiny_checkpoint(tmp_path_factory.mktemp("w"), config, name)

    fixture.__doc__ = doc
    return pytest.fixture(scope="session", name=name.removesuffix("_tiny.pt") + "_ckpt")(fixture)


rd_ckpt = tiny_fixture(TINY_RD, "rd_tiny.pt", "A tiny untrained rd checkpoint with its integer tables built.")
hyper_ckpt = tiny_fixture(TINY_HYPER, "hyper_tiny.pt", "A tiny untrained hyperprior checkpoint with its tables built.")
ctx_ckpt = tiny_fixture(TINY_CTX, "ctx_tiny.pt", "A tiny untrained context-model checkpoint (3 slices, checkerboard).")
ctx_plain_ckpt = tiny_fixture(TINY_CTX_PLAIN, "ctx_plain_tiny.pt", "The same without the checkerboard.")
resctx_ckpt = tiny_fixture(TINY_RESCTX, "resctx_tiny.pt", "A tiny untrained resctx checkpoint (ctx with residual blocks).")


@pytest.fixture(scope="session")
def seed_ckpt(tmp_path_factory):
    """Path of a tiny untrained seed-kind checkpoint (ResNet-18 trunk, 32 latent channels)."""
    torch.manual_seed(0)
    model = build_model(TINY_SEED).eval()
    path = str(tmp_path_factory.mktemp("w") / "seed_tiny.pt")
    save_checkpoint(path, model, precision="int8", step=0)
    return path
