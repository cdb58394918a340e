"""The context model (ctx): a mean-scale hyperprior with channel-wise context and a checkerboard inside each
slice, every mean and scale from integer networks."""
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from quantize import GaussianConditional, ste_round
from intnet import ACT_BITS, ACT_MAX, convs_of, fixed_point, int_net, read_scaled, scale_segments, weight_shift
from models.hyperprior import HyperConfig, SideLatents
from models.transform import TransformCodec


@dataclass
class CtxConfig(HyperConfig):
    """Hyper model with a mean-scale hyperprior and channel-wise context: the M latent channels in slices,
    each slice's means and scales predicted from the hyperprior and the slices decoded before it."""

    slices: tuple = (16, 16, 32, 64, 64)  # uneven, small first: the first channels carry the most energy
    context: int = 96  # hidden channels of each slice's context network
    spatial: int = 0  # hidden channels of each slice's checkerboard network (0 = no spatial context)
    kind: str = "ctx"


MEAN_BITS = 8  # fractional bits of the integer means, and so of the decoded latents ŷ = μ + symbol
GAIN_BITS = 16  # fractional bits of the integer gains that scale the means and the context inputs
LOG_BITS = 16  # fractional bits of the integer log-scales (the scale-index units)
CONTEXT_ROWS = 64  # latent rows per strip of the integer context networks (their 3×3 layer needs 1 row of halo)
VALUE_MAX = 1 << 40  # decoded latents are clamped here in fixed point, so every product fits in int64


def checkerboard(size, device=None):
    """The "black" squares (h, w) of a checkerboard, (0, 0) black: the latents a slice decodes first."""
    rows, cols = torch.arange(size[0], device=device), torch.arange(size[1], device=device)
    return (rows[:, None] + cols[None, :]) % 2 == 0


def unscaled(y, igain):
    """Decoded latents (MEAN_BITS fixed point, int64) times the integer inverse gains → ACT_BITS (float64, exact):
    what the context networks see."""
    return torch.div(y * igain, 1 << (MEAN_BITS + GAIN_BITS - ACT_BITS), rounding_mode="floor").double().clamp_(-ACT_MAX, ACT_MAX)


def masked(t, where):
    """The entries of t (C, h, w) at the (h, w) mask `where` (C, n), or all of t when where is None."""
    return t if where is None else t[:, where]


def context_net(cin, hidden, cout):
    """One slice's context network: a 3×3 convolution over the hyperprior's outputs and the decoded slices, two 1×1."""
    return nn.Sequential(nn.Conv2d(cin, hidden, 3, padding=1), nn.ReLU(), nn.Conv2d(hidden, hidden, 1), nn.ReLU(),
                         nn.Conv2d(hidden, cout, 1))


def float_chain(model, h, y, g, ig, rounding=ste_round):
    """The float context chain (training, estimates, the encoder search): h_s' output h, the latents y and the
    gains → the means and log-scales of every latent (y units) and the decoded latents μ + rounding(y − μ)."""
    m, means, log_scales, decoded = model.cfg.M, [], [], []
    black = checkerboard(y.shape[-2:], y.device)
    for k, (a, b) in enumerate(model.bounds):
        mean, log_scale = h[:, a:b], h[:, m + a : m + b]
        if k:
            d = model.context[k - 1](torch.cat([mean, log_scale, torch.cat(decoded, 1) * ig[:, :a]], 1))
            mean, log_scale = mean + d[:, : b - a], log_scale + d[:, b - a :]
        if model.spatial:
            mean_y = mean * g[:, a:b]
            d = model.spatial[k]((rounding(y[:, a:b] - mean_y) + mean_y) * ig[:, a:b] * black) * ~black
            mean, log_scale = mean + d[:, : b - a], log_scale + d[:, b - a :]
        mean = mean * g[:, a:b]
        decoded.append(rounding(y[:, a:b] - mean) + mean)
        means.append(mean)
        log_scales.append(log_scale)
    return torch.cat(means, 1), torch.cat(log_scales, 1), torch.cat(decoded, 1)


def integer_chain(model, z_hat, quality, size, pick):
    """The integer context chain of the coder: slice after slice (and within a slice, with a checkerboard, black
    squares then white), the exact mean (MEAN_BITS fixed point, y units) and scale index of every latent;
    pick(a, b, mean, index, where) gives the slice's integer symbols at the (h, w) mask `where` (None: all) —
    the encoder rounds, the decoder reads. Returns the decoded latents μ + symbol in MEAN_BITS fixed point (int64)."""
    stored_frac, step = model.index_units.tolist()
    if stored_frac != LOG_BITS or step <= 0 or model.gain_units.numel() == 0:
        raise ValueError("no integer tables (or built for other weights): rebuild the tables")
    level, m = model.table_level(quality), model.cfg.M
    gain, igain, offsets = (t[level].view(-1, 1, 1).cpu() for t in (model.gain_units, model.igain_units, model.index_offsets))
    feats, log_scales = model._hyper_fixed(z_hat, size)
    y = torch.zeros((m, *size), dtype=torch.int64)
    inputs = torch.zeros((m, *size), dtype=torch.float64)  # ŷ · inverse gain at ACT_BITS: what the context sees
    black = checkerboard(size)
    for k, (a, b) in enumerate(model.bounds):
        mean, log_scale = feats[a:b].double(), log_scales[a:b]
        if k:
            x = torch.cat([feats[a:b].double(), feats[m + a : m + b].double(), inputs[:a]])
            mean, log_scale = refined(model, model.context[k - 1], x, mean, log_scale)
        decoded = torch.zeros((b - a, *size), dtype=torch.int64)
        for half, where in enumerate((black, ~black) if model.spatial else (None,)):
            if half:  # white squares: refined from the black ones
                x = torch.where(black, unscaled(decoded, igain[a:b]), 0.0)
                mean, log_scale = refined(model, model.spatial[k], x, mean, log_scale)
            mean_y = torch.div(mean.clamp(-ACT_MAX, ACT_MAX).to(torch.int64) * gain[a:b],
                               1 << (ACT_BITS + GAIN_BITS - MEAN_BITS), rounding_mode="floor")
            index = torch.div(log_scale + offsets[a:b] + step // 2, step, rounding_mode="floor")
            symbols = pick(a, b, mean_y, index.clamp_(0, GaussianConditional.LEVELS - 1).to(torch.uint8), where)
            value = (mean_y + symbols.to(torch.int64) * (1 << MEAN_BITS)).clamp_(-VALUE_MAX, VALUE_MAX)
            decoded = value if where is None else torch.where(where, value, decoded)
        y[a:b] = decoded
        inputs[a:b] = unscaled(decoded, igain[a:b])
    return y


def refined(model, net, x, mean, log_scale):
    """Unscaled means (ACT_BITS, float64) and log-scales (LOG_BITS, int64) plus a context network's integer
    output on x (model._int_context, which tools/coding_report.py clocks)."""
    acc, frac = model._int_context(net, x)
    c = mean.shape[0]
    return mean + fixed_point(acc[:c], frac, ACT_BITS), log_scale + fixed_point(acc[c:], frac, LOG_BITS).to(torch.int64)


def int_context(net, x):
    """A context network as an integer network on its float64 integer input (C, h, w) at ACT_BITS, in strips of
    rows: (exact accumulator (C_out, h, w), its fractional bits)."""
    convs, rows, parts = convs_of(net), x.shape[1], []
    for r0 in range(0, rows, CONTEXT_ROWS):
        a, b = max(r0 - 1, 0), min(r0 + CONTEXT_ROWS + 1, rows)
        acc, frac = int_net(convs, x[None, :, a:b], ACT_BITS)
        parts.append(acc[0, :, r0 - a : r0 - a + min(CONTEXT_ROWS, rows - r0)])
    return torch.cat(parts, 1), frac


def coded_bits(model, latents, quality, rounding):
    """(bits, decoded latents μ + rounding(y − μ)) of batched latents y and side latents z (z rounded by
    `rounding` too) under the float networks: the coder's chain with relaxed rounding (the encoder search)."""
    y, z = latents["y"], rounding(latents["z"])
    g, ig = (t.to(y.device) for t in model.gains(quality))
    mean, log_scale, y_hat = float_chain(model, model.h_s(z)[..., : y.shape[-2], : y.shape[-1]], y, g, ig, rounding)
    bits = -torch.log2(model.gaussian.likelihood(y_hat - mean, torch.exp(log_scale) * g)).sum()
    return bits - torch.log2(model.prior.likelihood(z)).sum(), y_hat


@torch.no_grad()
def embed_scale_hyperprior(model, source):
    """Where source is a scale hyperprior (hyper), copy h_a's |u| half and h_s' log-scale half into the ctx model,
    the means starting at zero, so it starts coding exactly as the source; the names so filled."""
    m = model.cfg.M
    first, last = source.h_a[0].weight, source.h_s[-1].weight
    if first.shape[1] != m or last.shape[0] != m:
        return []
    model.h_a[0].weight.zero_()
    model.h_a[0].weight[:, m:] = first
    model.h_a[0].bias.copy_(source.h_a[0].bias)
    model.h_s[-1].weight.zero_()
    model.h_s[-1].weight[m:] = last
    model.h_s[-1].bias.zero_()
    model.h_s[-1].bias[m:] = source.h_s[-1].bias
    return ["h_a.0.weight", "h_s.4.weight", "h_s.4.bias"]


class CtxModel(SideLatents, TransformCodec):
    """The transform codec with a mean-scale hyperprior and a channel-wise context model (Minnen & Singh 2020,
    uneven slices as in He et al. 2022): h_s predicts a mean and a log-scale per latent, and each slice's
    context network refines them from the slices already decoded. Decoding runs slice after slice, every
    slice in parallel.

    Every number that decides a symbol's table or its value is integer: h_s and the context networks run
    as integer networks (int_net), the mean is fixed point with MEAN_BITS fractional bits, the coded symbol
    is round(y − μ) and the decoder's latent is exactly μ + symbol (integer_chain). The quality's gains enter
    as stored integers per table quality (gain_units, igain_units), like the scale-index offsets.
    """

    FIT_NOTE = ", hyperprior started as per-channel zero-mean Gaussians"
    INTEGER_NETWORKS = ("_hyper_fixed", "_int_context")
    ENTROPY_MODULES = ("prior", "h_a", "h_s", "context", "spatial")
    ENTROPY_LR_SCALE = 10.0  # the entropy networks learn at 10× the transforms' rate (they start from zero)
    # z sets the means, so moving it moves where every latent rounds to: no side search (rate alone) applies.
    # A re-rounding side search, measured on 2 Kodak images: 0.16 s a step, files −1.8 % at quality 6, +3.7 % at 2.
    SIDE_KEYS = ()

    def __init__(self, cfg):
        super().__init__(cfg)
        m = cfg.M
        if sum(cfg.slices) != m or min(cfg.slices) < 1:
            raise ValueError(f"slices {cfg.slices} do not split the {m} latent channels")
        # h_a sees u and |u| (the means need the signs); h_s gives the means, then the log-scales.
        self.add_side_latents(cfg, 2 * m, 2 * m)
        ends = np.cumsum(cfg.slices).tolist()
        self.bounds = list(zip([0] + ends[:-1], ends))
        self.context = nn.ModuleList(context_net(2 * (b - a) + a, cfg.context, 2 * (b - a)) for a, b in self.bounds[1:])
        # Checkerboard (He et al. 2021): the "white" latents of a slice are decoded after its "black" ones and
        # refined from them by a 3×3 network; black and white are each decoded in parallel.
        self.spatial = nn.ModuleList(context_net(b - a, cfg.spatial, 2 * (b - a)) for a, b in self.bounds) \
            if cfg.spatial else nn.ModuleList()
        for net in [*self.context, *self.spatial]:  # start as the plain mean-scale hyperprior
            nn.init.zeros_(net[-1].weight)
            nn.init.zeros_(net[-1].bias)
        self.register_buffer("gain_units", torch.zeros(0, m, dtype=torch.int64))  # round(gain · 2^GAIN_BITS)
        self.register_buffer("igain_units", torch.zeros(0, m, dtype=torch.int64))  # of the inverse gains

    def param_groups(self):
        """Transforms and gains at the run's learning rate; h_a, h_s and the context networks at ENTROPY_LR_SCALE
        times it: started at zero from a hyper checkpoint, at the transforms' fine-tuning rate the means and
        the context barely moved in 850 steps (mean |weight| of their last layers 0.0005 … 0.002)."""
        entropy = [p for name, p in self.named_parameters() if name.startswith(("h_a.", "h_s.", "context.", "spatial."))]
        ids = {id(p) for p in entropy}
        return [{"params": [p for p in self.parameters() if id(p) not in ids]},
                {"params": entropy, "lr_scale": self.ENTROPY_LR_SCALE}]

    def hyper_input(self, u):
        """What h_a sees of the unscaled latents: the latents and their magnitudes."""
        return torch.cat([u, u.abs()], 1)

    def entropy_forward(self, u, quality, noise=None):
        """Training pass of the entropy model: noisy latents around their means for the rate, μ + round(y − μ)
        (straight through) for the decoder."""
        g, ig = (t.to(u.device) for t in self.gains(quality))
        y = u * g
        z_tilde, z_lik = self.prior(self.h_a(self.hyper_input(u)), training=True)
        h = self.h_s(z_tilde)[..., : y.shape[-2], : y.shape[-1]]
        mean, log_scale, y_hat = float_chain(self, h, y, g, ig)
        y_tilde = y + (noise if noise is not None else torch.rand_like(y) - 0.5)
        y_lik = self.gaussian.likelihood(y_tilde - mean, torch.exp(log_scale) * g)
        return {"y_hat": y_hat, "likelihoods": [y_lik, z_lik], "pixels": self._pixels(u)}

    # -- encoder search (effort.py)
    def rate_bits(self, latents, quality):
        """Bits of batched decoded latents and side latents under the float networks' means and scales;
        differentiable."""
        return coded_bits(self, latents, quality, lambda v: v)[0]

    def rd_cost(self, latents, x, quality, size, rounding=None):
        """bits per pixel + λ·255²·MSE of batched latents: every latent quantized around its mean as the coder
        does, μ + rounding(y − μ) slice after slice (None: the latents are the decoded ones already)."""
        bits, y_hat = coded_bits(self, latents, quality, rounding or (lambda v: v))
        return self._rd(bits, y_hat, x, quality, size)

    @torch.no_grad()
    def settled(self, latents, quality):
        """A search's continuous latents (unbatched, on the CPU) → the coder's: z rounded, then the integer chain
        rounds y − μ around the exact integer means."""
        return self._encoded(latents["y"].double(), torch.round(latents["z"]), quality)

    # -- the integer tables and networks (coding)
    @property
    def index_frac(self):
        """Fractional bits of the integer log-scales the table index is taken from."""
        return LOG_BITS

    def build_tables(self):
        """The hyperprior's tables (units of LOG_BITS) and the integer gains of every table quality."""
        super().build_tables()
        g, ig = (t.detach().squeeze(-1).squeeze(-1).double().cpu() for t in self.gains(self.table_qualities()))
        self.gain_units = torch.round(g * 2.0**GAIN_BITS).to(torch.int64)
        self.igain_units = torch.round(ig * 2.0**GAIN_BITS).to(torch.int64)

    def has_tables(self):
        """True once every integer table, the index offsets and the integer gains are built or loaded."""
        return super().has_tables() and self.gain_units.numel() > 0 and self.igain_units.numel() > 0

    def _hyper_fixed(self, z_hat, size):
        """Integer h_s of z (1, H, …) → its outputs at ACT_BITS fractional bits (2M, h, w; exact in float32, the
        context networks' input) and the log-scales at LOG_BITS (M, h, w; int64)."""
        m, frac = self.cfg.M, weight_shift(self.h_s[-1]) + ACT_BITS
        feats = torch.empty((2 * m, *size), dtype=torch.float32)
        log_scale = torch.empty((m, *size), dtype=torch.int64)
        for r, acc in self._h_s_strips(z_hat, size):
            feats[:, r : r + acc.shape[2]] = fixed_point(acc[0], frac, ACT_BITS).clamp(-ACT_MAX, ACT_MAX)
            log_scale[:, r : r + acc.shape[2]] = fixed_point(acc[0, m:], frac, LOG_BITS).to(torch.int64)
        return feats, log_scale

    _int_context = staticmethod(int_context)  # a method, so tools/coding_report.py can clock it

    # -- coding interface
    @torch.no_grad()  # not inference_mode: callers may edit the returned tensors
    def latents(self, u, quality):
        """A coding tile's unscaled latents (M, h, w) → {"y": decoded latents μ + round(y − μ) (float64, exact),
        "z": integer side latents}."""
        y = self.scaled(u[None], quality)[0].cpu().double()
        return self._encoded(y, self.side_latents(u[None])[0].cpu(), quality)

    def _encoded(self, y, z, quality):
        """Scaled latents y (M, h, w, float64) and integer z → the decoded latents of the coder's symbols
        round(y − μ) (the symbols are kept for write_latents)."""
        coded = []

        def rounding(a, b, mean, index, where):
            """The encoder's symbols: round(y − μ)."""
            symbols = torch.round(y[a:b] - mean / 2.0**MEAN_BITS).to(torch.int64)
            coded.append((masked(symbols, where), masked(index, where)))
            return symbols

        latents = {"y": integer_chain(self, z[None], quality, y.shape[1:], rounding).double() / 2.0**MEAN_BITS, "z": z}
        self._coded = (latents["y"], latents["y"]._version, z, z._version, quality, coded)
        return latents

    def _symbols(self, latents, quality):
        """The integer symbols and scale indices of a latents dict, slice by slice: [(symbols, index), …];
        those latents() just made are reused (same tensors, not modified since: their version counters)."""
        memo = getattr(self, "_coded", None)
        if memo and memo[0] is latents["y"] and memo[2] is latents["z"] and memo[4] == quality \
                and memo[1] == latents["y"]._version and memo[3] == latents["z"]._version:
            return memo[5]
        y, coded = torch.round(latents["y"].double() * 2.0**MEAN_BITS).to(torch.int64), []

        def given(a, b, mean, index, where):
            """The symbols of the given latents: (ŷ − μ) in whole steps."""
            symbols = torch.div(y[a:b] - mean + (1 << (MEAN_BITS - 1)), 1 << MEAN_BITS, rounding_mode="floor")
            coded.append((masked(symbols, where), masked(index, where)))
            return symbols

        integer_chain(self, latents["z"][None], quality, y.shape[1:], given)
        return coded

    def write_latents(self, latents, quality, encode):
        """Payload: z under its factorized prior, then slice after slice the symbols round(y − μ) under the
        Gaussian tables of their scale index (scale_segments)."""
        segments = self.prior.segments(latents["z"], 0)
        for symbols, index in self._symbols(latents, quality):
            segments += scale_segments(self.gaussian, symbols.numpy(), index)
        return encode(segments)

    def read_latents(self, payload, shape, quality, open_decoder):
        """Inverse of write_latents: {"y": decoded latents (M, h, w), "z": side latents}."""
        dec = open_decoder(payload)
        z = self.prior.read(dec, self.side_shape(shape), 0)

        def read(a, b, mean, index, where):
            """The symbols of the slice (at `where`) from the payload."""
            values = torch.from_numpy(read_scaled(self.gaussian, dec, masked(index, where))).to(torch.int64)
            if where is None:
                return values
            symbols = torch.zeros(index.shape, dtype=torch.int64)
            symbols[:, where] = values
            return symbols

        return {"y": integer_chain(self, z[None], quality, shape[1:], read).double() / 2.0**MEAN_BITS, "z": z}

    def likelihoods(self, latents, quality):
        """Likelihoods of decoded latents {"y": (1, M, h, w), "z": …} under the integer means and table scales,
        and of the side latents."""
        scales = GaussianConditional.table_scales().to(torch.float32)
        parts = self._symbols({k: v[0].cpu() for k, v in latents.items()}, quality)
        lik = torch.cat([self.gaussian.likelihood(s.float(), scales[index.long()]).reshape(-1) for s, index in parts])
        return [lik.view(1, -1, 1, 1).to(latents["y"].device), self.prior.likelihood(latents["z"])]

    def evaluate(self, x, quality):
        """Real-coding pass (validation): the coder's integer means and scale indices, per sample."""
        u = self.g_a(x)
        self.build_tables()  # the weights move during training: tables of the current ones
        decoded = [self.latents(u[i], float(q)) for i, q in enumerate(quality.tolist())]
        y_hat = torch.stack([d["y"] for d in decoded]).to(x.device, torch.float32)
        per_sample = [self.likelihoods({"y": y_hat[i : i + 1], "z": d["z"][None].to(x.device)}, float(q))
                      for i, (q, d) in enumerate(zip(quality.tolist(), decoded))]
        lik = [torch.cat(parts) for parts in zip(*per_sample)]
        return {"x_hat": self.g_s(y_hat * self.gains(quality)[1].to(x.device)), "likelihoods": lik}

    @torch.no_grad()
    def adopt(self, source):
        """Copy what fits of another model (TransformCodec.adopt); from a scale hyperprior (hyper), its h_a and h_s
        too (embed_scale_hyperprior), so the new model starts coding exactly as the old one."""
        skipped = super().adopt(source)
        filled = embed_scale_hyperprior(self, source)
        self.build_tables()
        return [k for k in skipped if k not in filled]
