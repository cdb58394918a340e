"""The context model (ctx): integer means and scales, their agreement with the float networks, and its start
from a hyper checkpoint."""
import copy
import dataclasses

import numpy as np
import pytest
import torch

import intnet
import models.context as context_module
from checkpoint import load_checkpoint
from codec import compress, decompress, read_latents
from conftest import TINY_CTX, TINY_HYPER, photo_like
from model import CtxConfig, CtxModel, build_model
from models.context import MEAN_BITS, float_chain, integer_chain
from models.residual import ResBottleneck, ResCtxConfig
from quantize import GaussianConditional


@pytest.fixture(scope="module", params=["ctx_ckpt", "ctx_plain_ckpt"])
def ctx(request):
    """The tiny ctx model (random context networks), with and without the checkerboard, and its identity."""
    m, ckpt = load_checkpoint(request.getfixturevalue(request.param))
    return m, bytes.fromhex(ckpt["model_id"])


def chain_means(m, lat, quality):
    """The integer chain's means (y units) and scale indices of every latent of decoded latents."""
    means, indices = torch.zeros(lat["y"].shape, dtype=torch.float64), torch.zeros(lat["y"].shape, dtype=torch.long)

    def record(a, b, mean, index, where):
        mean = mean.double() / 2**MEAN_BITS
        keep = torch.ones(mean.shape[1:], dtype=torch.bool) if where is None else where
        means[a:b][:, keep], indices[a:b][:, keep] = mean[:, keep], index.long()[:, keep]
        return torch.round(lat["y"][a:b] - mean)

    integer_chain(m, lat["z"][None], quality, lat["y"].shape[1:], record)
    return means, indices


def integer_and_float(m, u, quality):
    """The integer chain's (means, scale indices) of an image's latents, and the float networks' on the same
    decoded latents."""
    lat = m.latents(u, quality)
    mean_i, index_i = chain_means(m, lat, quality)
    g, ig = m.gains(quality)
    with torch.no_grad():
        h = m.h_s(lat["z"][None])[..., : u.shape[1], : u.shape[2]]
        mean_f, log_scale, _ = float_chain(m, h, lat["y"][None].float(), g, ig)
        log_s = log_scale + g.log()
    ref = torch.round((log_s - np.log(GaussianConditional.SCALE_MIN)) / GaussianConditional.log_step())
    return mean_i, index_i, mean_f[0].double(), ref[0].clamp(0, GaussianConditional.LEVELS - 1)


@pytest.mark.parametrize("quality", [1.0, 4.25, 8.0])
def test_integer_means_and_scales_match_the_float_networks(ctx, quality):
    """Integer means within a few hundredths of a step of the float ones; table indices the same for > 98 %
    of latents and never more than one level apart (the tables' gains are those of a table quality)."""
    m, _ = ctx
    torch.manual_seed(1)
    u = torch.randn(TINY_CTX.M, 12, 20) * 3
    mean_i, index_i, mean_f, index_f = integer_and_float(m, u, quality)
    assert (mean_i - mean_f).abs().max() < 0.05
    assert (index_i - index_f).abs().max() <= 1 and (index_i == index_f).float().mean() > 0.98


def test_decoded_latents_are_mean_plus_whole_steps_and_round_trip(ctx):
    """ŷ − μ is a whole number for every latent, and decoding gives the encoder's latents exactly."""
    m, mid = ctx
    rgb = photo_like(80, 112, 2)
    data = compress(m, mid, rgb, quality=5.5)
    _, lat, q = read_latents(m, mid, data)
    means = chain_means(m, lat, q)[0]
    steps = lat["y"] - means
    assert torch.equal(steps, torch.round(steps))
    assert (means % 1 != 0).float().mean() > 0.5  # the means are not whole numbers
    out, _, _ = decompress(m, mid, data)
    assert out.shape == rgb.shape


def test_fresh_tables_decode_like_the_stored_ones(ctx):
    """Tables rebuilt from the weights give the stored tables' latents bit for bit."""
    m, mid = ctx
    data = compress(m, mid, photo_like(64, 64, 5), quality=3)
    stored = read_latents(m, mid, data)[1]
    fresh = copy.deepcopy(m)
    fresh.build_tables()
    again = read_latents(fresh, mid, data)[1]
    assert all(torch.equal(stored[k], again[k]) for k in stored)


def test_context_in_strips_equals_the_whole(ctx, monkeypatch):
    """Strips of rows (the memory bound on large images) give exactly the whole image's latents."""
    m, _ = ctx
    u = torch.randn(TINY_CTX.M, 23, 9) * 3
    whole = m.latents(u, 4.0)
    monkeypatch.setattr(context_module, "CONTEXT_ROWS", 5)
    monkeypatch.setattr(intnet, "STRIP_ROWS", 2)
    strips = m.latents(u, 4.0)
    assert torch.equal(whole["y"], strips["y"]) and torch.equal(whole["z"], strips["z"])


def test_started_from_hyper_it_codes_as_hyper(hyper_ckpt):
    """adopt() of a hyper model gives zero means and the same scales: the same file size to within 1 % and the
    same picture (± 1 level) as the hyper model, give or take the fixed bytes of each slice."""
    hyper, ckpt = load_checkpoint(hyper_ckpt)
    torch.manual_seed(0)
    ctx = CtxModel(CtxConfig(N=TINY_HYPER.N, M=TINY_HYPER.M, H=TINY_HYPER.H, slices=(8, 16), spatial=8))
    ctx.adopt(hyper)
    ctx.eval()
    rgb = photo_like(192, 256, 7)
    a, b = compress(hyper, b"hhhh", rgb, quality=4), compress(ctx, b"cccc", rgb, quality=4)
    assert abs(len(a) - len(b)) <= 0.01 * len(a) + 8 * len(ctx.bounds)  # + each part's sparse / escape headers
    pa, pb = decompress(hyper, b"hhhh", a)[0], decompress(ctx, b"cccc", b)[0]
    assert np.abs(pa.astype(int) - pb.astype(int)).max() <= 1


def test_training_pass_reaches_the_context_networks():
    """The training loss has gradients in every slice's context network (they start at zero output)."""
    torch.manual_seed(0)
    m = build_model(TINY_CTX)
    x = torch.rand(2, 3, 64, 64)
    quality, noise = m.draw_randomness(torch.tensor([1, 2]), 64)
    loss, parts = m.loss(x, m(x, quality, noise), quality)
    loss.backward()
    assert all(net[-1].weight.grad.abs().sum() > 0 for net in [*m.context, *m.spatial]) and len(m.spatial) == 3
    assert parts["bpp"] > 0


def test_a_wider_model_adopts_a_narrower_one_and_codes_the_same(ctx_ckpt):
    """adopt() of a ctx model with fewer transform channels (N) embeds its transforms: the wider model starts as the
    same codec (same file, same picture), and the weights out of its new channels receive gradients."""
    narrow, _ = load_checkpoint(ctx_ckpt)
    wide = build_model(dataclasses.replace(narrow.cfg, N=narrow.cfg.N + 8))
    assert wide.adopt(narrow) == []
    wide.eval()
    rgb = photo_like(64, 96, 8)
    a, b = compress(narrow, b"nnnn", rgb, quality=5), compress(wide, b"nnnn", rgb, quality=5)
    assert a == b and np.array_equal(decompress(narrow, b"nnnn", a)[0], decompress(wide, b"nnnn", b)[0])
    wide.train()
    x = torch.rand(2, 3, 64, 64)
    quality, noise = wide.draw_randomness(torch.tensor([1, 2]), 64)
    wide.loss(x, wide(x, quality, noise), quality)[0].backward()
    new = slice(narrow.cfg.N, None)  # the silenced weights from the new channels learn first, the rest follows
    assert wide.g_a[-1].weight.grad[:, new].abs().sum() > 0 and wide.g_s[-1].weight.grad[new].abs().sum() > 0


def test_under_bf16_autocast_only_the_analysis_loses_precision():
    """The training pass under CPU bf16 autocast: the analysis' layers compute in bf16, the synthesis' in fp32;
    reconstruction and likelihoods come back fp32 and the loss stays within 1 % of the fp32 one at the same
    weights and noise (the entropy model runs in fp32)."""
    torch.manual_seed(0)
    m = build_model(TINY_CTX)
    x = torch.rand(2, 3, 64, 64)
    quality, noise = m.draw_randomness(torch.tensor([3, 4]), 64)
    dtypes = {}
    for name, layer in m.named_modules():
        if isinstance(layer, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)) and name.startswith(("g_a", "g_s")):
            layer.register_forward_hook(lambda mod, inp, out, name=name: dtypes.update({name: out.dtype}))
    with torch.no_grad():
        ref = m.loss(x, m(x, quality, noise), quality)[0]
        dtypes.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(x, quality, noise)
        assert {d for n, d in dtypes.items() if n.startswith("g_a")} == {torch.bfloat16}
        assert {d for n, d in dtypes.items() if n.startswith("g_s")} == {torch.float32}
        assert out["x_hat"].dtype == torch.float32 and all(lik.dtype == torch.float32 for lik in out["likelihoods"])
        assert torch.allclose(m.loss(x, out, quality)[0], ref, rtol=0.01)


def test_resctx_starts_from_ctx_as_the_same_codec(ctx_ckpt):
    """The model of one more file (models/residual.py) adopts a ctx checkpoint and codes exactly as it does (the
    files differ in the kind byte and the checksum only, the pictures not at all); its residual blocks, which
    start as the identity, receive gradients from the first step."""
    ctx, _ = load_checkpoint(ctx_ckpt)
    fields = {k: v for k, v in dataclasses.asdict(ctx.cfg).items() if k != "kind"}
    res = build_model(ResCtxConfig(**fields, blocks=(1, 1, 2)))
    assert res.adopt(ctx) == [] and sum(isinstance(m, ResBottleneck) for m in res.modules()) == 8
    res.eval()
    rgb = photo_like(64, 96, 8)
    a, b = compress(ctx, b"nnnn", rgb, quality=5), compress(res, b"nnnn", rgb, quality=5)
    assert len(a) == len(b) and sum(x != y for x, y in zip(a, b)) <= 5
    assert np.array_equal(decompress(ctx, b"nnnn", a)[0], decompress(res, b"nnnn", b)[0])
    res.train()
    x = torch.rand(2, 3, 64, 64)
    quality, noise = res.draw_randomness(torch.tensor([1, 2]), 64)
    res.loss(x, res(x, quality, noise), quality)[0].backward()
    assert all(m.body[-1].weight.grad.abs().sum() > 0 for m in res.modules() if isinstance(m, ResBottleneck))
