"""The seed's B-bit quantizer formulas, the integer tables and their determinism."""
import numpy as np
import pytest
import torch

from conftest import TINY_RD
from model import build_model, subpixel_conv
from quantize import PRECISION, pmf_to_freqs, quantize_bbit


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
