"""Quantizers and entropy models.

The latent coding lives here and nowhere else:

* the seed's B-bit clamp quantizer (`quantize_bbit`), whose rate is fixed by the latent size and B;
* a learned factorized prior (`FactorizedPrior`, Ballé et al. 2018, one density per channel) that
  gives the rate term of the rate–distortion model and, once trained, the integer frequency tables
  the entropy coder uses (`FactorizedPrior.build_tables`);
* a zero-mean Gaussian conditional (`GaussianConditional`) for latents whose scale a hyperprior
  predicts, with integer tables for 64 log-spaced scales;
* the codes of integers beyond the tables (Exp-Golomb escapes) and of mostly-zero values (sparse),
  written as symbol segments under fixed tables.

Models turn latents into (symbols, integer frequencies) segments with these; the entropy coders of
codec.py turn segments into bytes.

The density is learned for unscaled latents and stretched by a per-level scale (the rd model's
per-quality gains), so one density gives exact bin probabilities at every rate. Integer tables
(`freqs`, `starts`, `offsets`, `lengths`, one table per scale level and channel, each ending in an
escape symbol) are the only thing that decides a symbol's probability at coding time, so files
decode identically on every machine.

This module imports nothing of the project's.
"""
import copy
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

PRECISION = 16  # bits of the integer frequency tables: every table sums to 2**PRECISION
TAIL_MASS = 1e-6  # probability left outside a channel's table on each side (coded by an escape)
MAX_HALF_RANGE = 1023  # a channel's table never spans more than 2 * MAX_HALF_RANGE + 1 symbols
LIKELIHOOD_BOUND = 1e-9  # floor of likelihoods, keeps -log2 finite during training


class DecodeError(ValueError):
    """Symbols that no valid payload holds (a corrupted file); the message says what is wrong."""


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
        self.register_buffer("starts", torch.zeros(0, dtype=torch.int32))

    def _logits_cdf(self, x):
        """Logit of the cumulative density at x, shaped (C, 1, n)."""
        for i, matrix in enumerate(self.matrices):
            x = torch.matmul(F.softplus(matrix), x) + self.biases[i]
            if i < len(self.factors):
                x = x + torch.tanh(self.factors[i]) * torch.tanh(x)
        return x

    @torch.autocast("cuda", enabled=False)
    def likelihood(self, y, scale=None):
        """P(round(y)) for y shaped (B, C, H, W) whose density is the learned one stretched by `scale`.

        The density is learned for the unscaled latents u; y = u · scale (scale broadcastable to y,
        e.g. a per-quality gain of shape (B, C, 1, 1)). The probability of the unit bin around y is
        then F((y + 1/2) / scale) − F((y − 1/2) / scale), exact for every scale: one density serves
        every quality without the mismatch of a density shared by all of them.
        """
        b, c, h, w = y.shape
        # float32 even under autocast: bf16 likelihoods would make the rate term meaningless.
        lo, hi = y.float() - 0.5, y.float() + 0.5
        if scale is not None:
            lo, hi = lo / scale.float(), hi / scale.float()
        lower = self._logits_cdf(lo.permute(1, 0, 2, 3).reshape(c, 1, -1))
        upper = self._logits_cdf(hi.permute(1, 0, 2, 3).reshape(c, 1, -1))
        # Subtract on the side where the sigmoid is not saturated, for precision.
        sign = -torch.sign(lower + upper).detach()
        p = torch.abs(torch.sigmoid(sign * upper) - torch.sigmoid(sign * lower))
        p = p.clamp_min(LIKELIHOOD_BOUND)
        return p.reshape(c, b, h, w).permute(1, 0, 2, 3)

    def forward(self, y, training=True, noise=None, scale=None):
        """Return (noisy or rounded y, its likelihoods); noise in [-0.5, 0.5) may be given (else drawn)."""
        if training:
            y_noisy = y + (noise if noise is not None else torch.rand_like(y) - 0.5)
        else:
            y_noisy = torch.round(y)
        return y_noisy, self.likelihood(y_noisy, scale)

    def fit(self, y, scale=None, steps=200, lr=2e-2):
        """Fit the density alone to fixed latents y (B, C, H, W) by maximum likelihood (a warm start)."""
        opt = torch.optim.Adam(self.parameters(), lr=lr)
        for _ in range(steps):
            bits = -torch.log2(self.likelihood(y + torch.rand_like(y) - 0.5, scale)).mean()
            opt.zero_grad()
            bits.backward()
            opt.step()
        return bits.item()

    @torch.no_grad()
    def build_tables(self, scales=None):
        """Compute the integer frequency tables for each row of scales (L, C) (once, after training)."""
        scales = torch.ones(1, self.channels) if scales is None else scales
        grid = torch.arange(-MAX_HALF_RANGE - 1, MAX_HALF_RANGE + 2, dtype=torch.float64)
        # float64 copy: the tables are built once, so precision beats speed here.
        ref = copy.deepcopy(self).double().cpu()  # built on the CPU whatever the training device
        flat, starts, offsets, lengths = [], [], [], []
        for row in scales.detach().double().cpu():
            x = (grid - 0.5).view(1, 1, -1) / row.view(-1, 1, 1)
            freqs, offs = cdf_tables(torch.sigmoid(ref._logits_cdf(x)).squeeze(1), grid)
            total = sum(len(f) for f in flat)
            starts.append(np.cumsum([total] + [len(f) for f in freqs[:-1]]))
            flat += freqs
            offsets.append(offs)
            lengths.append([len(f) for f in freqs])
        self.freqs = torch.from_numpy(np.concatenate(flat).astype(np.int32))
        self.starts = torch.tensor(np.array(starts), dtype=torch.int32)
        self.offsets = torch.tensor(offsets, dtype=torch.int32)
        self.lengths = torch.tensor(lengths, dtype=torch.int32)

    def has_tables(self):
        """True once build_tables() has run (or tables were loaded)."""
        return self.freqs.numel() > 0

    def tables(self, level=0):
        """The integer frequency table of every channel at a scale level, as numpy arrays (on the CPU)."""
        freqs = self.freqs.cpu().numpy()
        starts, lengths = self.starts[level].tolist(), self.lengths[level].tolist()
        return [freqs[s : s + n] for s, n in zip(starts, lengths)]

    def to_symbols(self, y, level=0):
        """Integer latents (C, H, W) → (int32 table symbols per channel, the escaped values in C-order)."""
        return symbols_of(np.asarray(y), *self.channel_tables(level))

    def from_symbols(self, s, level=0, escaped=()):
        """Inverse of to_symbols: symbols (C, H, W, overwritten) and escaped values (or a function of their
        count that reads them) back to float32 latent values."""
        return values_of(s, *self.channel_tables(level), escaped)

    def segments(self, v, level=0):
        """(symbols, frequencies) segments of integer values v (C, h, w) at a level: one per channel, then
        the escaped values."""
        sym, escaped = self.to_symbols(v.cpu().numpy(), level)
        return [(sym[c].ravel(), table) for c, table in enumerate(self.tables(level))] + escape_segments(escaped)

    def read(self, dec, shape, level=0):
        """Inverse of segments, from a decoder with take(freqs, n): values (C, h, w) as a float32 tensor."""
        symbols = np.stack([dec.take(t, shape[1] * shape[2]) for t in self.tables(level)]).reshape(shape)
        return torch.from_numpy(self.from_symbols(symbols, level, lambda count: read_escapes(dec, count)))

    def channel_tables(self, level):
        """Offset and escape symbol (length − 1) of every channel's table at a level, shaped (C, 1, 1)."""
        offsets, lengths = self.offsets[level].cpu().numpy(), self.lengths[level].cpu().numpy()
        return offsets.reshape(-1, 1, 1), (lengths - 1).astype(np.uint32).reshape(-1, 1, 1)


class GaussianConditional(nn.Module):
    """Zero-mean Gaussian of a given scale convolved with U(-1/2, 1/2): the latents' rate under a
    (scale) hyperprior. Coding uses LEVELS integer tables for log-spaced scales SCALE_MIN … SCALE_MAX;
    each latent's table index is an integer the model computes exactly (see HyperModel)."""

    LEVELS, SCALE_MIN, SCALE_MAX = 64, 0.11, 256.0

    def __init__(self):
        super().__init__()
        self.register_buffer("freqs", torch.zeros(0, dtype=torch.int32))
        self.register_buffer("offsets", torch.zeros(0, dtype=torch.int32))
        self.register_buffer("lengths", torch.zeros(0, dtype=torch.int32))

    @classmethod
    def log_step(cls):
        """Spacing of the table scales in log space."""
        return (math.log(cls.SCALE_MAX) - math.log(cls.SCALE_MIN)) / (cls.LEVELS - 1)

    @classmethod
    def table_scales(cls):
        """The scales of the LEVELS coding tables (float64)."""
        return torch.exp(math.log(cls.SCALE_MIN) + cls.log_step() * torch.arange(cls.LEVELS, dtype=torch.float64))

    @torch.autocast("cuda", enabled=False)
    def likelihood(self, y, scale):
        """P(round(y)) under N(0, scale²) ∗ U(-1/2, 1/2), for any float scale (training and estimates)."""
        scale = scale.float().clamp_min(self.SCALE_MIN)
        v = y.float().abs()  # the upper tail of a symmetric density is the precise side
        p = torch.special.ndtr((0.5 - v) / scale) - torch.special.ndtr((-0.5 - v) / scale)
        return p.clamp_min(LIKELIHOOD_BOUND)

    @torch.no_grad()
    def build_tables(self):
        """Integer tables (each ending in an escape symbol) of every table scale."""
        grid = torch.arange(-MAX_HALF_RANGE - 1, MAX_HALF_RANGE + 2, dtype=torch.float64)
        cdf = torch.special.ndtr((grid - 0.5).view(1, -1) / self.table_scales().view(-1, 1))
        freqs, offsets = cdf_tables(cdf, grid)
        self.freqs = torch.from_numpy(np.concatenate(freqs).astype(np.int32))
        self.offsets = torch.tensor(offsets, dtype=torch.int32)
        self.lengths = torch.tensor([len(f) for f in freqs], dtype=torch.int32)

    def has_tables(self):
        """True once build_tables() has run (or tables were loaded)."""
        return self.freqs.numel() > 0

    def tables(self):
        """The integer frequency table of every scale level, as numpy arrays."""
        freqs, ends = self.freqs.cpu().numpy(), np.cumsum(self.lengths.tolist())
        return [freqs[e - n : e] for e, n in zip(ends, self.lengths.tolist())]

    def to_symbols(self, y, counts):
        """Integer latents grouped by table index (1-D, counts[k] with index k) → (int32 symbols, escaped
        values in that order): the grouped order needs no per-latent table lookup."""
        return symbols_of(y, *self.group_tables(counts))

    def from_symbols(self, s, counts, escaped):
        """Inverse of to_symbols: grouped int32 symbols (overwritten) and the escaped values (or a function of
        their count that reads them) → float32 latent values."""
        return values_of(s, *self.group_tables(counts), escaped)

    def group_tables(self, counts):
        """Offset and escape symbol (length − 1) of every latent of latents grouped by table index."""
        escapes = (self.lengths.cpu().numpy() - 1).astype(np.uint32)
        return np.repeat(self.offsets.cpu().numpy(), counts), np.repeat(escapes, counts)


def cdf_tables(cdf, grid):
    """Integer tables from CDFs (rows, n) evaluated at grid − 1/2: (list of freqs, list of offsets).

    Symbols offset … offset + len − 2 keep all but TAIL_MASS of each side; the last symbol is the
    escape, carrying the mass outside, so no value is ever clamped.
    """
    tails = torch.tensor([TAIL_MASS, 1 - TAIL_MASS], dtype=torch.float64)
    freqs, offsets = [], []
    for c in range(cdf.shape[0]):
        lo, hi = (int(i) for i in torch.searchsorted(cdf[c].contiguous(), tails))
        lo, hi = max(lo - 1, 0), min(hi, len(grid) - 2)  # symbols k_lo … k_hi keep the mass
        inside = (cdf[c, lo + 1 : hi + 2] - cdf[c, lo : hi + 1]).numpy()
        escape = float(cdf[c, lo] + 1 - cdf[c, hi + 1])
        freqs.append(pmf_to_freqs(np.append(inside, escape)))
        offsets.append(int(grid[lo]))
    return freqs, offsets


def symbols_of(y, offsets, escapes):
    """Integer latents (NumPy) → (int32 table symbols, escaped values) given each value's table offset
    and escape symbol (the table's last, uint32; both broadcastable to y).

    Values outside their table get the escape symbol and are returned separately (C-order) for the
    coder to write out in full. In-place int32 passes: this runs on every latent of an image, so it
    counts in the coding time and in the memory of large images.
    """
    if y.size and max(-y.min(), y.max()) >= 2**30:  # two reductions, no temporary array
        raise ValueError("a latent value is too large to code (|value| ≥ 2**30)")
    v = np.empty(y.shape, np.int32)
    np.rint(y, out=v, casting="unsafe")
    q = v - offsets
    out = q.view(np.uint32) >= escapes  # one unsigned compare: a value below the table wraps to a huge one
    np.copyto(q, escapes.astype(np.int32, copy=False), where=out)
    return q, v[out]


def values_of(s, offsets, escapes, escaped=()):
    """Inverse of symbols_of: int32 table symbols (overwritten) and the escaped values → float32 latent
    values. `escaped` may be a function of the number of escape symbols that returns the values (a
    decoder reading them from the stream), which saves the caller a pass to count them."""
    out = s.view(np.uint32) == escapes  # same-type compare: int32 against uint32 would widen both to int64
    n = np.count_nonzero(out)
    escaped = escaped(n) if callable(escaped) else escaped
    if n != len(escaped):
        raise DecodeError("payload corrupted (number of escaped values does not match the escape symbols)")
    v = np.add(s, offsets, out=s)
    if n:
        # The encoder escapes only values its table cannot hold: one it could is another payload's reading.
        inside = np.asarray(escaped, np.int64) - np.broadcast_to(offsets, out.shape)[out]
        if np.any((inside >= 0) & (inside < np.broadcast_to(escapes, out.shape)[out])):
            raise DecodeError("payload corrupted (an escaped value its table holds)")
        v[out] = escaped
    return v.astype(np.float32)


# ----------------------------------------------------------------------------- integers beyond the tables
# Escaped latents are rare (< 1e-6 of the mass per side), so a plain Exp-Golomb code is enough:
# the prefix length under a uniform table of 32, then the bits below the leading one.
EG_LENGTHS = np.full(32, 1 << (PRECISION - 5), np.int64)
EG_BITS = np.full(2, 1 << (PRECISION - 1), np.int64)
# Prefix lengths favouring short codes (P(n) ~ 2^-(n+1)), for the small numbers of sparse coding.
EG_SHORT = np.maximum((1 << (PRECISION - 1)) >> np.arange(32), 1)
EG_SHORT[0] += (1 << PRECISION) - EG_SHORT.sum()


def _bit_shifts(n):
    """For Exp-Golomb codes of n[i] payload bits each, written back to back: each bit's shift, MSB first."""
    starts = np.cumsum(n) - n
    return np.repeat(starts + n - 1, n) - np.arange(int(n.sum()))


def escape_segments(values, lengths=EG_LENGTHS):
    """Exp-Golomb segments (lengths, bits) of escaped integer latent values (zigzag-mapped, signed);
    `lengths` is the table of the prefix (code length) symbols."""
    v = np.asarray(values, np.int64)
    z = np.where(v >= 0, 2 * v, -2 * v - 1) + 1
    n = (np.frexp(z.astype(np.float64))[1] - 1).astype(np.int64)  # exact: |z| < 2**53
    if len(n) and n.max() >= len(lengths):
        raise ValueError("a latent value is too large to code (|value| ≥ 2**30)")
    bits = (np.repeat(z, n) >> _bit_shifts(n)) & 1
    return [(n, lengths), (bits, EG_BITS)]


def read_escapes(dec, count, lengths=EG_LENGTHS):
    """Inverse of escape_segments: the next `count` escaped values from a SymbolDecoder."""
    if count == 0:  # the usual case, and a few array operations saved per group
        return np.zeros(0, np.int64)
    n = dec.take(lengths, count).astype(np.int64)
    bits = dec.take(EG_BITS, int(n.sum())).astype(np.int64)
    owner = np.repeat(np.arange(count), n)
    z = (np.int64(1) << n) + np.bincount(owner, weights=bits << _bit_shifts(n), minlength=count).astype(np.int64)
    return np.where(z % 2 == 1, (z - 1) // 2, -(z // 2))


def _gap_shift(n, count):
    """Low bits of each gap written raw (Rice-style): about log2 of the mean gap, from what both sides know."""
    return max(int(n // (count + 1)).bit_length() - 1, 0)


def sparse_segments(values):
    """Segments of mostly-zero integer values: the number of nonzeros, the gaps between them (high part
    Exp-Golomb, low bits raw), their values."""
    nz = np.flatnonzero(values)
    gaps, k = np.diff(nz, prepend=-1) - 1, _gap_shift(len(values), len(nz))
    low = (np.repeat(gaps, k) >> np.tile(np.arange(k - 1, -1, -1), len(gaps))) & 1
    return (escape_segments([len(nz)]) + escape_segments(gaps >> k, EG_SHORT) + [(low, EG_BITS)]
            + escape_segments(np.rint(values[nz]), EG_SHORT))


def read_sparse(dec, n):
    """Inverse of sparse_segments for n values, from a SymbolDecoder: (positions, values) of the nonzeros."""
    count = int(read_escapes(dec, 1)[0])
    if not 0 <= count <= n:
        raise DecodeError("payload corrupted (sparse count out of range)")
    k = _gap_shift(n, count)
    high = read_escapes(dec, count, EG_SHORT)
    low = dec.take(EG_BITS, count * k).astype(np.int64).reshape(count, k) << np.arange(k - 1, -1, -1)
    positions = np.cumsum((high << k) + low.sum(axis=1) + 1) - 1
    if count and (positions.min() < 0 or positions[-1] >= n):
        raise DecodeError("payload corrupted (sparse position out of range)")
    values = read_escapes(dec, count, EG_SHORT)
    if not np.all(values):  # the encoder lists nonzeros only
        raise DecodeError("payload corrupted (a listed sparse value is zero)")
    return positions, values
