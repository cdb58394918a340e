"""Quantizers and entropy models.

Two kinds of latent coding live here and nowhere else:

* the seed's B-bit clamp quantizer (`quantize_bbit`), whose rate is fixed by the latent size and B;
* a learned factorized prior (`FactorizedPrior`, Ballé et al. 2018, one density per channel) that
  gives the rate term of the rate–distortion model and, once trained, the integer frequency tables
  the entropy coder uses (`FactorizedPrior.build_tables`).

Integer tables (`freqs`, `offsets`, `lengths`) are the only thing that decides a symbol's
probability at coding time, so files decode identically on every machine.

This module imports nothing of the project's.
"""
import copy
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

PRECISION = 16  # bits of the integer frequency tables: every table sums to 2**PRECISION
TAIL_MASS = 1e-6  # probability left outside a channel's table on each side (values there are clamped)
MAX_HALF_RANGE = 1023  # a channel's table never spans more than 2 * MAX_HALF_RANGE + 1 symbols
LIKELIHOOD_BOUND = 1e-9  # floor of likelihoods, keeps -log2 finite during training


def quantize_bbit(v, bits, mode="noise"):
    """The seed's B-bit quantizer of values in [0, 1]; `mode` picks what is returned.

    Modes:
      'noise'      v + U(-0.5, 0.5) * 2**-B  (default for training: unbiased, one step wide)
      'seed_noise' v + (randn * 0.5 - 0.5) * 2**-B, exactly the seed README's formula
      'ste'        round to the grid in the forward pass, identity gradient
      'symbols'    int(clamp(v, 0, 1) * 2**B + 0.5), integers in 0 … 2**B (2**B + 1 levels)
      'dequantize' v are symbols; returns v / 2**B

    Why the default differs from the seed: the seed's noise is Gaussian with mean -0.5 step, so
    during training the decoder sees latents biased half a step low, while inference rounds to the
    nearest level (zero mean error). Uniform noise of one step matches the rounding error's
    distribution and mean, so what the decoder learns is what it gets at inference.
    """
    scale = 2.0 ** -bits
    if mode == "noise":
        return v + (torch.rand_like(v) - 0.5) * scale
    if mode == "seed_noise":
        return v + (torch.randn_like(v) * 0.5 - 0.5) * scale
    if mode == "ste":
        q = torch.floor(v.clamp(0, 1) / scale + 0.5) * scale
        return v + (q - v).detach()
    if mode == "symbols":
        return torch.floor(v.clamp(0, 1) * 2 ** bits + 0.5).to(torch.int32)
    if mode == "dequantize":
        return v.to(torch.float32) * scale
    raise ValueError(f"unknown quantizer mode {mode!r}")


def ste_round(x):
    """Round in the forward pass, pass the gradient straight through."""
    return x + (torch.round(x) - x).detach()


def pmf_to_freqs(pmf, precision=PRECISION):
    """Turn a probability vector into integer frequencies >= 1 that sum to exactly 2**precision."""
    pmf = np.asarray(pmf, dtype=np.float64)
    total = 1 << precision
    if len(pmf) > total // 2:
        raise ValueError("alphabet too large for the table precision")
    pmf = np.maximum(pmf, 0) / max(pmf.sum(), 1e-300)
    freqs = np.floor(pmf * (total - len(pmf))).astype(np.int64) + 1
    # Hand the rounding remainder to the most probable symbols so the sum is exact.
    deficit = total - int(freqs.sum())
    order = np.argsort(-pmf, kind="stable")
    freqs[order[: deficit % len(pmf)]] += 1
    freqs[order[0]] += deficit - deficit % len(pmf)
    return freqs


class FactorizedPrior(nn.Module):
    """Learned per-channel density (Ballé et al. 2018, appendix 6.1) convolved with U(-1/2, 1/2)."""

    def __init__(self, channels, filters=(3, 3, 3), init_scale=10.0):
        super().__init__()
        self.channels = channels
        dims = (1,) + tuple(filters) + (1,)
        scale = init_scale ** (1 / (len(filters) + 1))
        self.matrices = nn.ParameterList()
        self.biases = nn.ParameterList()
        self.factors = nn.ParameterList()
        for i in range(len(filters) + 1):
            init = math.log(math.expm1(1 / scale / dims[i + 1]))
            self.matrices.append(nn.Parameter(torch.full((channels, dims[i + 1], dims[i]), init)))
            self.biases.append(nn.Parameter(torch.rand(channels, dims[i + 1], 1) - 0.5))
            if i < len(filters):
                self.factors.append(nn.Parameter(torch.zeros(channels, dims[i + 1], 1)))
        # Integer coding tables, filled by build_tables() after training and saved with the weights.
        self.register_buffer("freqs", torch.zeros(0, dtype=torch.int32))
        self.register_buffer("offsets", torch.zeros(0, dtype=torch.int32))
        self.register_buffer("lengths", torch.zeros(0, dtype=torch.int32))

    def _logits_cdf(self, x):
        """Logit of the cumulative density at x, shaped (C, 1, n)."""
        for i, matrix in enumerate(self.matrices):
            x = torch.matmul(F.softplus(matrix), x) + self.biases[i]
            if i < len(self.factors):
                x = x + torch.tanh(self.factors[i]) * torch.tanh(x)
        return x

    @torch.autocast("cuda", enabled=False)
    def likelihood(self, y):
        """P(round(y)) under the density convolved with a unit box, for y shaped (B, C, H, W)."""
        b, c, h, w = y.shape
        # float32 even under autocast: bf16 likelihoods would make the rate term meaningless.
        v = y.float().permute(1, 0, 2, 3).reshape(c, 1, -1)
        lower = self._logits_cdf(v - 0.5)
        upper = self._logits_cdf(v + 0.5)
        # Subtract on the side where the sigmoid is not saturated, for precision.
        sign = -torch.sign(lower + upper).detach()
        p = torch.abs(torch.sigmoid(sign * upper) - torch.sigmoid(sign * lower))
        p = p.clamp_min(LIKELIHOOD_BOUND)
        return p.reshape(c, b, h, w).permute(1, 0, 2, 3)

    def forward(self, y, training=True, noise=None):
        """Return (noisy or rounded y, its likelihoods); noise in [-0.5, 0.5) may be given (else drawn)."""
        if training:
            y_noisy = y + (noise if noise is not None else torch.rand_like(y) - 0.5)
        else:
            y_noisy = torch.round(y)
        return y_noisy, self.likelihood(y_noisy)

    def fit(self, y, steps=200, lr=2e-2):
        """Fit the density alone to fixed latents y (B, C, H, W) by maximum likelihood (a warm start)."""
        opt = torch.optim.Adam(self.parameters(), lr=lr)
        for _ in range(steps):
            bits = -torch.log2(self.likelihood(y + torch.rand_like(y) - 0.5)).mean()
            opt.zero_grad()
            bits.backward()
            opt.step()
        return bits.item()

    @torch.no_grad()
    def build_tables(self):
        """Compute the integer frequency tables of every channel (once, after training)."""
        grid = torch.arange(-MAX_HALF_RANGE - 1, MAX_HALF_RANGE + 2, dtype=torch.float64)
        # float64 copy: the tables are built once, so precision beats speed here.
        ref = copy.deepcopy(self).double().cpu()  # built on the CPU whatever the training device
        cdf = torch.sigmoid(ref._logits_cdf((grid - 0.5).expand(self.channels, 1, -1))).squeeze(1)
        tails = torch.tensor([TAIL_MASS, 1 - TAIL_MASS], dtype=torch.float64)
        freqs, offsets = [], []
        for c in range(self.channels):
            lo, hi = (int(i) for i in torch.searchsorted(cdf[c], tails))
            lo, hi = max(lo - 1, 0), min(hi, len(grid) - 2)  # symbols k_lo … k_hi keep the mass
            freqs.append(pmf_to_freqs((cdf[c, lo + 1 : hi + 2] - cdf[c, lo : hi + 1]).numpy()))
            offsets.append(int(grid[lo]))
        table = np.zeros((self.channels, max(len(f) for f in freqs)), dtype=np.int32)
        for c, f in enumerate(freqs):
            table[c, : len(f)] = f
        self.freqs = torch.from_numpy(table)
        self.offsets = torch.tensor(offsets, dtype=torch.int32)
        self.lengths = torch.tensor([len(f) for f in freqs], dtype=torch.int32)

    def has_tables(self):
        """True once build_tables() has run (or tables were loaded)."""
        return self.freqs.numel() > 0

    def tables(self):
        """The integer frequency table of every channel, as a list of numpy arrays (on the CPU)."""
        freqs, lengths = self.freqs.cpu().numpy(), self.lengths.cpu().numpy()
        return [freqs[c, : lengths[c]] for c in range(self.channels)]

    def to_symbols(self, y):
        """Map latents (C, H, W) to table indices 0 … length-1 per channel (clamping the tails)."""
        offsets, lengths = self.offsets.to(y.device, torch.int64), self.lengths.to(y.device, torch.int64)
        q = torch.round(y).to(torch.int64) - offsets.view(-1, 1, 1)
        return torch.minimum(q.clamp_min(0), (lengths - 1).view(-1, 1, 1)).to(torch.int32)

    def from_symbols(self, s):
        """Inverse of to_symbols: table indices (C, H, W) back to integer latent values."""
        return (s.to(torch.int64) + self.offsets.to(s.device, torch.int64).view(-1, 1, 1)).to(torch.float32)
