"""The seed's B-bit quantizer formulas, the integer tables and their determinism."""
import numpy as np
import pytest
import torch

from conftest import TINY_HYPER, TINY_RD, photo_like
from model import build_model
from models.layers import subpixel_conv
from quantize import PRECISION, GaussianConditional, pmf_to_freqs, quantize_bbit, symbols_of, values_of


def test_symbols_formula():
    v = torch.tensor([-0.3, 0.0, 0.4999 / 256, 0.5 / 256, 0.5, 1.0, 1.7])
    s = quantize_bbit(v, 8, "symbols")
    assert s.tolist() == [0, 0, 0, 1, 128, 256, 256]  # int(clamp(v,0,1) * 2**B + 0.5): 257 levels
    assert torch.allclose(quantize_bbit(s, 8, "dequantize"), torch.tensor([0, 0, 0, 1, 128, 256, 256]) / 256)


@pytest.mark.parametrize("bits", [2, 8])
def test_uniform_noise_is_unbiased_and_one_step_wide(bits):
    torch.manual_seed(0)
    v = torch.full((200_000,), 0.5)
    d = (quantize_bbit(v, bits, "noise") - v) * 2 ** bits
    assert d.abs().max() <= 0.5 and abs(d.mean()) < 0.01 and abs(d.var() - 1 / 12) < 0.005


def test_seed_noise_is_the_readme_formula():
    torch.manual_seed(0)
    v = torch.zeros(200_000)
    d = (quantize_bbit(v, 8, "seed_noise") - v) * 256  # (randn * 0.5 - 0.5): mean -0.5, std 0.5 steps
    assert abs(d.mean() + 0.5) < 0.01 and abs(d.std() - 0.5) < 0.01


def test_ste_rounds_forward_and_passes_gradient():
    v = torch.tensor([0.2, 0.7], requires_grad=True)
    out = quantize_bbit(v, 1, "ste")
    assert out.tolist() == [0.0, 0.5]
    out.sum().backward()
    assert v.grad.tolist() == [1.0, 1.0]


def test_pmf_to_freqs_is_exact_and_positive():
    rng = np.random.default_rng(1)
    for n in (1, 2, 17, 500):
        f = pmf_to_freqs(rng.random(n) ** 8)
        assert f.sum() == 1 << PRECISION and f.min() >= 1


def test_symbols_escape_on_both_sides_and_map_back():
    """Values below, inside and above each table become symbols or the escape symbol and come back exactly,
    with the escaped values given as an array or read through a function of their count."""
    y = np.array([[-7.0, -2.0, 0.0, 2.0, 3.0, 1e6], [-3.0, -1.0, 0.0, 1.0, 4.0, -1e6]], np.float32)
    offsets, escapes = np.array([[-2], [-1]], np.int32), np.array([[5], [3]], np.uint32)  # [-2, 2] and [-1, 1]
    s, escaped = symbols_of(y, offsets, escapes)
    assert s.tolist() == [[5, 0, 2, 4, 5, 5], [3, 0, 1, 2, 3, 3]] and escaped.tolist() == [-7, 3, 1e6, -3, 4, -1e6]
    assert np.array_equal(values_of(s.copy(), offsets, escapes, escaped), y)
    counts = []
    assert np.array_equal(values_of(s.copy(), offsets, escapes, lambda n: counts.append(n) or escaped), y)
    assert counts == [6]
    with pytest.raises(ValueError, match="escaped values"):
        values_of(s.copy(), offsets, escapes, escaped[:-1])
    inside = escaped.copy()
    inside[1] = 2  # the first row's table holds 2: an escape the encoder never writes, so a damaged payload
    with pytest.raises(ValueError, match="its table holds"):
        values_of(s.copy(), offsets, escapes, inside)


def test_sparse_lists_nonzero_values_only():
    """A sparse group decodes its nonzeros; a payload listing a zero among them (never written) is refused."""
    from codec import SymbolDecoder, entropy_encode
    from quantize import DecodeError, read_sparse, sparse_segments

    values = np.array([0, 0, 3, 0, -1, 0, 0, 0], np.float32)
    for listed, ok in ((values, True), (np.array([0, 0, 3, 0, -1, 0, 0, 0.4], np.float32), False)):
        segments = sparse_segments(listed)  # 0.4 is nonzero to the encoder's test, rounded to 0 when written
        dec = SymbolDecoder(entropy_encode(segments, "constriction"), "constriction")
        if ok:
            positions, got = read_sparse(dec, len(values))
            assert positions.tolist() == [2, 4] and got.tolist() == [3, -1]
        else:
            with pytest.raises(DecodeError, match="sparse value is zero"):
                read_sparse(dec, len(values))


def test_tables_identical_across_two_fresh_builds():
    tables = []
    for _ in range(2):
        torch.manual_seed(3)
        m = build_model(TINY_RD)
        m.build_tables()
        tables.append((m.prior.freqs.clone(), m.prior.offsets.clone(), m.prior.lengths.clone(), m.prior.starts.clone()))
    for a, b in zip(*tables):
        assert a.dtype == torch.int32 and torch.equal(a, b)
    assert len(m.table_qualities()) == tables[0][2].shape[0] == 29  # qualities 1, 1.25, …, 8
    for level in range(len(m.table_qualities())):
        assert all(int(t.sum()) == 1 << PRECISION and t.min() >= 1 for t in m.prior.tables(level))


@pytest.mark.parametrize("k", [3, 5, 7])
def test_subpixel_conv_equals_the_transposed_convolution(k):
    """The decoder's fast last layer computes the same map as the trained transposed convolution."""
    torch.manual_seed(k)
    deconv = torch.nn.ConvTranspose2d(6, 3, k, stride=2, padding=k // 2, output_padding=1)
    x = torch.randn(2, 6, 9, 7)
    assert torch.allclose(subpixel_conv(deconv)(x), deconv(x), atol=1e-5)


def test_gaussian_tables_are_exact_and_identical_across_builds():
    """64 scale tables, each summing to 2^16 with every symbol ≥ 1, identical when rebuilt."""
    a, b = GaussianConditional(), GaussianConditional()
    a.build_tables()
    b.build_tables()
    assert all(torch.equal(getattr(a, n), getattr(b, n)) for n in ("freqs", "offsets", "lengths"))
    tables = a.tables()
    assert len(tables) == GaussianConditional.LEVELS
    assert all(int(t.sum()) == 1 << PRECISION and t.min() >= 1 for t in tables)
    assert [len(t) for t in tables] == sorted(len(t) for t in tables)  # wider scale, wider table


def test_gaussian_likelihoods_sum_to_one():
    values = torch.arange(-300, 301, dtype=torch.float32).view(1, 1, -1, 1)
    for s in (0.05, 0.3, 2.0, 40.0):
        p = GaussianConditional().likelihood(values, torch.full_like(values, s))
        assert abs(float(p.sum()) - 1) < 1e-4


def random_hyper(seed):
    """A tiny hyper model with a random, non-trivial h_s and its tables built."""
    torch.manual_seed(seed)
    m = build_model(TINY_HYPER).eval()
    for p in m.h_s.parameters():
        p.data.normal_(0, 0.3)
    m.build_tables()
    return m


def test_integer_hyper_synthesis_matches_the_float_one():
    """The integer h_s picks the table the float network's scale rounds to, give or take one level."""
    m = random_hyper(0)
    z = torch.randint(-6, 7, (1, TINY_HYPER.H, 3, 5)).float()
    for q in (1.0, 4.25, 8.0):
        index = m.scale_index(z, q, (12, 20))
        with torch.no_grad():
            log_s = m.h_s(z) + m.gains(q)[0].log()
        ref = torch.round((log_s - np.log(GaussianConditional.SCALE_MIN)) / GaussianConditional.log_step())
        ref = ref.clamp(0, GaussianConditional.LEVELS - 1)
        assert index.dtype == torch.uint8 and index.shape == (1, TINY_HYPER.M, 12, 20)
        index = index.long()
        assert (index - ref).abs().max() <= 1 and (index == ref).float().mean() > 0.98


def test_integer_hyper_synthesis_in_strips_equals_the_whole():
    """Strips of z (the memory bound for large images) give exactly the whole image's indices."""
    m = random_hyper(1)
    z = torch.randint(-6, 7, (1, TINY_HYPER.H, 9, 4)).float()
    whole = m.scale_index(z, 3.0, (35, 14), strip=100)
    for strip in (1, 2, 3):
        assert torch.equal(m.scale_index(z, 3.0, (35, 14), strip=strip), whole)
    u = torch.randn(1, TINY_HYPER.M, 37, 6) * 4
    with torch.no_grad():
        z_whole = m.side_latents(u, strip=400)
        for strip in (4, 8, 12):
            z = m.side_latents(u, strip=strip)
            assert z.shape == z_whole.shape == (1, TINY_HYPER.H, 10, 2)
            assert (z - z_whole).abs().max() <= 1 and (z == z_whole).float().mean() > 0.99  # float h_a: rare rounding flips


def test_hyperprior_starts_open():
    """After fit_prior the side latents are not all rounded to zero (a closed hyperprior learns nothing)."""
    torch.manual_seed(0)
    m = build_model(TINY_HYPER)
    crops = torch.stack([torch.from_numpy(photo_like(64, 64, i)).permute(2, 0, 1).float() / 255 for i in range(4)])
    m.init_transforms(crops)
    with torch.no_grad():
        z = m.side_latents(m.g_a(crops))
    assert (z != 0).float().mean() > 0.3
