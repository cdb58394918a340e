"""Encoder effort: effort 0 is the one-pass encoder, higher efforts code cheaper latents that today's
decoder reads unchanged, and every model either searches or says why it cannot."""
import os

import numpy as np
import pytest
import torch

import codec
import effort
from checkpoint import load_checkpoint
from conftest import ROOT, photo_like
from imagefiles import read_image


@pytest.fixture(scope="module")
def hyper():
    """The shipped default model and its identity."""
    model, ckpt = load_checkpoint(os.path.join(ROOT, "weights", "hyper.pt"))
    return model, bytes.fromhex(ckpt["model_id"])


@pytest.fixture(scope="module")
def crop():
    """A 64×96 crop of a sample photo."""
    return np.ascontiguousarray(read_image(os.path.join(ROOT, "tests", "conformance", "rgb_256x192.png"))[0][:64, :96])


def cost(model, data, rgb, quality):
    """The model's rate–distortion cost of the latents a file holds (what the search lowers)."""
    _, latents, _ = codec.read_latents(model, codec.unpack(data)[0]["model_id"], data)
    x = effort.image_tensor(rgb, model.stride, "cpu")
    with torch.no_grad():
        return float(model.rd_cost({k: v[None].float() for k, v in latents.items()}, x, quality, rgb.shape[:2]))


def test_effort_0_is_the_one_pass_encoder(hyper, crop):
    model, mid = hyper
    assert codec.compress(model, mid, crop, quality=3, effort=0) == codec.compress(model, mid, crop, quality=3)


@pytest.mark.parametrize("level", [2, 4])
def test_higher_effort_costs_less_and_decodes_unchanged(hyper, crop, level):
    """Side search (2) and full search (4): a lower cost than effort 0, and the same decoder reads the file."""
    model, mid = hyper
    base = codec.compress(model, mid, crop, quality=4)
    searched = codec.compress(model, mid, crop, quality=4, effort=level)
    assert searched != base and cost(model, searched, crop, 4) < cost(model, base, crop, 4)
    rgb, mode, _ = codec.decompress(model, mid, searched)
    assert rgb.shape == crop.shape and mode == "RGB"
    assert np.array_equal(codec.decompress(model, mid, searched)[0], rgb)  # decoding stays deterministic


def test_search_is_reproducible_and_leaves_the_global_rng(hyper, crop):
    """The search draws from its own generator: the same file every time, the caller's random state untouched."""
    model, mid = hyper
    state = torch.get_rng_state()
    first = codec.compress(model, mid, crop, quality=4, effort=4)
    assert torch.equal(torch.get_rng_state(), state)
    assert codec.compress(model, mid, crop, quality=4, effort=4) == first


def test_side_search_keeps_the_picture(hyper, crop):
    """Effort 1–3 move only the side latents: the decoded image is effort 0's, the file smaller."""
    model, mid = hyper
    base, searched = (codec.compress(model, mid, crop, quality=6, effort=e) for e in (0, 3))
    assert len(searched) < len(base)
    assert np.array_equal(codec.decompress(model, mid, searched)[0], codec.decompress(model, mid, base)[0])


def test_progress_and_bad_levels(hyper, seed_ckpt):
    """progress(done, total) follows the search; levels outside 0 … 9 and the seed's full search are errors."""
    model, mid = hyper
    seen = []
    codec.compress(model, mid, photo_like(32, 32), quality=2, effort=1, progress=lambda d, t: seen.append((d, t)))
    steps = effort.LEVELS[1][1]  # then one for coding the (only) tile
    assert seen[-1] == (steps + 1,) * 2 and len(seen) == steps + 1 and seen[0] == (1, steps + 1)
    for bad in (-1, 10, 2.5):
        with pytest.raises(ValueError, match="effort"):
            codec.compress(model, mid, photo_like(16, 16), effort=bad)
    seed, ckpt = load_checkpoint(seed_ckpt)
    with pytest.raises(ValueError, match="effort 0 only"):
        codec.compress(seed, bytes.fromhex(ckpt["model_id"]), photo_like(32, 32), effort=4)


def test_levels_without_side_latents():
    """A model without side latents spends efforts 2–3 on a short full search; effort 1 and the side-latent
    levels are unchanged."""
    assert [effort.steps_of(e) for e in range(len(effort.LEVELS))] == list(effort.LEVELS)
    plain = [effort.steps_of(e, side_latents=False) for e in range(len(effort.LEVELS))]
    assert plain[:4] == [(0, 0), (0, 0), (effort.SHORT_FULL[2], 0), (effort.SHORT_FULL[3], 0)]
    assert all(full == effort.LEVELS[e][0] and side == 0 for e, (full, side) in enumerate(plain) if e >= 4)
    assert 0 < plain[2][0] < plain[3][0] < plain[4][0]


@pytest.fixture(scope="module")
def ctx():
    """The shipped context model and its identity."""
    model, ckpt = load_checkpoint(os.path.join(ROOT, "weights", "ctx.pt"))
    return model, bytes.fromhex(ckpt["model_id"])


@pytest.mark.parametrize("name", ["hyper", "ctx"])
def test_settled_start_is_effort_0(name, hyper, ctx, crop):
    """A search that does not move makes effort 0's latents: settled(relaxed_latents) == latents."""
    model, _ = {"hyper": hyper, "ctx": ctx}[name]
    u = codec.analysis_of(model, crop)
    settled, direct = model.settled(model.relaxed_latents(u, 3.5), 3.5), model.latents(u, 3.5)
    assert settled.keys() == direct.keys()
    assert all(torch.equal(settled[k].double(), direct[k].double()) for k in direct)


def test_ctx_full_search(ctx, crop):
    """ctx's full search moves y and z around the exact integer means: a lower cost, and the same decoder
    reads the file; with no side search (z moves the means) effort 1 makes effort 0's file and efforts 2–3
    run a short full search, never costlier than effort 0."""
    model, mid = ctx
    base = codec.compress(model, mid, crop, quality=5)
    assert codec.compress(model, mid, crop, quality=5, effort=1) == base
    assert all(cost(model, codec.compress(model, mid, crop, quality=5, effort=e), crop, 5) <= cost(model, base, crop, 5)
               for e in (2, 3))
    searched = codec.compress(model, mid, crop, quality=5, effort=4)
    assert searched != base and cost(model, searched, crop, 5) < cost(model, base, crop, 5)
    assert np.array_equal(codec.decompress(model, mid, searched)[0], codec.decompress(model, mid, searched)[0])


