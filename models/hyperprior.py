"""The scale hyperprior model (Ballé et al. 2018), its hyper-synthesis run as an integer network; and
SideLatents, the side-information half that the context model shares."""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from quantize import FactorizedPrior, GaussianConditional, ste_round
from intnet import (ACT_BITS, ACT_MAX, INDEX_HALO, SIDE_HALO, STRIP_ROWS, convs_of, int_net, read_scaled,
                    scale_segments, weight_shift)
from models.base import HYPER_LAMBDAS
from models.factorized import RDConfig
from models.layers import down, up
from models.transform import TransformCodec


@dataclass
class HyperConfig(RDConfig):
    """RD model plus a scale hyperprior: H channels in the hyper transforms and the side latents z."""

    H: int = 64
    lambdas: tuple = HYPER_LAMBDAS
    kind: str = "hyper"


class SideLatents:
    """Side latents z = h_a(hyper_input(u)) of the unscaled latents u, coded with a factorized prior, and the
    hyper-synthesis h_s that predicts from them, run as an integer network for coding. A mixin of the models
    that have a hyperprior (hyper, ctx): its modules are attributes of the model, because their names are
    part of the model's identity that every file's header carries (checkpoint.model_id)."""

    SIDE_KEYS = ("z",)

    def add_side_latents(self, cfg, inputs, outputs):
        """Create h_a (inputs channels → H), h_s (H → outputs), z's prior, the Gaussian tables and the buffers of
        the per-quality scale-index offsets (in h_s' integer output units) and of those units; stored, so no
        libm call decides an index."""
        h = cfg.H
        self.prior = FactorizedPrior(h)  # of z
        self.h_a = nn.Sequential(nn.Conv2d(inputs, h, 3, padding=1), nn.ReLU(), down(h, h, 5), nn.ReLU(), down(h, h, 5))
        self.h_s = nn.Sequential(up(h, h, 3), nn.ReLU(), up(h, h, 3), nn.ReLU(), nn.Conv2d(h, outputs, 3, padding=1))
        self.gaussian = GaussianConditional()
        self.register_buffer("index_offsets", torch.zeros(0, cfg.M, dtype=torch.int64))
        self.register_buffer("index_units", torch.zeros(2, dtype=torch.int64))

    def side_shape(self, shape):
        """Shape of the side latents z for latents of shape (M, h, w): h_a halves each side twice, rounding up."""
        return (self.cfg.H, -(-shape[1] // 4), -(-shape[2] // 4))

    def side_latents(self, u, strip=4 * STRIP_ROWS, rounded=True):
        """Integer (or, not rounded, continuous) side latents z of the unscaled latents u (B, M, h, w), computed
        over strips of `strip` rows of u (a multiple of 4) with a halo, which bounds memory on large images."""
        h, parts = u.shape[2], []
        for r0 in range(0, h, strip):
            a, b = max(r0 - SIDE_HALO, 0), min(r0 + strip + SIDE_HALO, h)
            z = self.h_a(self.hyper_input(u[:, :, a:b]))
            parts.append(z[:, :, (r0 - a) // 4 : (r0 - a) // 4 + -(-min(strip, h - r0) // 4)])
        z = torch.cat(parts, 2)
        return torch.round(z) if rounded else z

    @torch.no_grad()
    def relaxed_latents(self, u, quality):
        """The latents and side latents before rounding (where effort.py's search starts)."""
        return {"y": self.scaled(u[None], quality)[0], "z": self.side_latents(u[None], rounded=False)[0]}

    def _h_s_strips(self, z_hat, size, strip=STRIP_ROWS):
        """The integer hyper-synthesis of integer side latents, strip by strip with a halo: (first latent row,
        exact output accumulator (B, C, rows, size[1]) in float64) per strip of `strip` rows of z."""
        z = z_hat.detach().to("cpu", torch.float64).clamp(-ACT_MAX, ACT_MAX)
        for r0 in range(0, z.shape[2], strip):
            a, b = max(r0 - INDEX_HALO, 0), min(r0 + strip + INDEX_HALO, z.shape[2])
            acc = int_net(convs_of(self.h_s), z[:, :, a:b], 0)[0][:, :, 4 * (r0 - a) : 4 * (r0 - a + strip)]
            yield 4 * r0, acc[..., : max(0, size[0] - 4 * r0), : size[1]]

    def build_tables(self):
        """Integer tables: z's factorized prior, the Gaussian scale tables, and the per-quality index offsets."""
        self.prior.build_tables()
        self.gaussian.build_tables()
        log_g = self.gains(self.table_qualities())[0].detach().squeeze(-1).squeeze(-1).double().cpu().log()
        units = 2.0 ** self.index_frac
        self.index_offsets = torch.round((log_g - math.log(GaussianConditional.SCALE_MIN)) * units).to(torch.int64)
        self.index_units = torch.tensor([self.index_frac, round(GaussianConditional.log_step() * units)])

    def has_tables(self):
        """True once every integer table (z prior, Gaussian scales, index offsets) is built or loaded."""
        return (self.prior.has_tables() and self.gaussian.has_tables() and self.index_offsets.numel() > 0
                and int(self.index_units[1]) > 0)

    @torch.no_grad()
    def fit_prior(self, x):
        """Start the entropy model on crops x: h_s as per-channel Gaussians (zero last-layer weights,
        bias = log std of u), z scaled to a std of 2, then z's prior fitted alone; returns z's bits per value."""
        u = self.g_a(x)
        last = self.h_s[-1]
        last.weight.zero_()
        last.bias.zero_()  # the ctx model's means (its first M outputs) start at zero
        last.bias[-self.cfg.M :] = u.std(dim=(0, 2, 3)).clamp_min(1e-3).log()
        # A random h_a gives |z| ≪ 1/2 on these small latents, so every z would round to 0 and the
        # hyperprior would stay closed (measured: it did for 600 steps); start z with a std of 2.
        z = self.h_a(self.hyper_input(u))
        last = self.h_a[-1]
        scale = 2.0 / z.std().clamp_min(1e-6)
        last.weight.mul_(scale)
        last.bias.mul_(scale)
        with torch.enable_grad():
            return self.prior.fit(z * scale)


class HyperModel(SideLatents, TransformCodec):
    """The transform codec with a scale hyperprior (Ballé et al. 2018): side latents z = h_a(|u|), coded with a
    factorized prior, predict every latent's Gaussian scale through h_s.

    At coding time h_s runs as an integer network (int_conv) and the scale of each latent is an integer
    table index, so symbol probabilities are bit-identical on every machine. z does not depend on the
    quality; the quality's gain shifts the predicted log-scale per channel.
    """

    FIT_NOTE = ", hyperprior started as per-channel Gaussians"
    INTEGER_NETWORKS = ("scale_index",)
    ENTROPY_MODULES = ("prior", "h_a", "h_s")

    def __init__(self, cfg):
        super().__init__(cfg)
        self.add_side_latents(cfg, cfg.M, cfg.M)

    def hyper_input(self, u):
        """What h_a sees of the unscaled latents: their magnitudes (the scale hyperprior predicts no signs)."""
        return u.abs()

    def entropy_forward(self, u, quality, noise=None):
        """The entropy model's training pass on unscaled latents u: {"y_hat": rounded latents (straight through),
        "likelihoods": [latents, side latents], "pixels": the image area they cover}."""
        y = self.scaled(u, quality)
        z_tilde, z_lik = self.prior(self.h_a(self.hyper_input(u)), training=True)
        y_tilde = y + (noise if noise is not None else torch.rand_like(y) - 0.5)
        return {"y_hat": ste_round(y), "likelihoods": [self._y_likelihood(y_tilde, z_tilde, quality), z_lik],
                "pixels": self._pixels(u)}

    def _y_likelihood(self, y, z, quality):
        """Likelihood of (noisy, rounded or relaxed) latents y under the scales the float h_s predicts from z."""
        log_scale = self.h_s(z)[..., : y.shape[-2], : y.shape[-1]]  # z is rounded up in size
        return self.gaussian.likelihood(y, torch.exp(log_scale) * self.gains(quality)[0].to(y.device))

    @torch.no_grad()  # not inference_mode: callers may edit the returned tensors
    def latents(self, u, quality):
        """A coding tile's unscaled latents (M, h, w) → {"y": integer latents, "z": integer side latents}; h_a runs
        in strips (side_latents)."""
        return {"y": torch.round(self.scaled(u[None], quality))[0], "z": self.side_latents(u[None])[0]}

    def write_latents(self, latents, quality, encode):
        """Payload: z under its factorized prior, then the latents under the Gaussian tables of their scale index
        (scale_segments)."""
        y, z = latents["y"], latents["z"]
        index = self.scale_index(z[None], quality, y.shape[1:])[0]
        return encode(self.prior.segments(z, 0) + scale_segments(self.gaussian, y.numpy(), index))

    def read_latents(self, payload, shape, quality, open_decoder):
        """Inverse of write_latents: {"y": latents (M, h, w), "z": side latents}."""
        dec = open_decoder(payload)
        z = self.prior.read(dec, self.side_shape(shape), 0)
        y = read_scaled(self.gaussian, dec, self.scale_index(z[None], quality, shape[1:])[0])
        return {"y": torch.from_numpy(y), "z": z}

    def rate_bits(self, latents, quality):
        """Bits of batched latents and side latents under the Gaussians the float h_s predicts (coding uses the
        integer h_s, which agrees to within one table level); differentiable."""
        y, z = latents["y"], latents["z"]
        return -torch.log2(self._y_likelihood(y, z, quality)).sum() - torch.log2(self.prior.likelihood(z)).sum()

    def scale_index(self, z_hat, quality, size, strip=STRIP_ROWS):
        """Integer Gaussian table index (B, M, h, w) as uint8 of every latent, from integer side latents
        z_hat; size = (h, w) of the latents (z covers them rounded up).

        Computed only with exact integer arithmetic (int_conv, then int64), on the CPU, so the entropy
        tables chosen for a file are the same on every machine. It runs over strips of `strip` rows of
        z with a halo, which bounds memory on large images; exact arithmetic makes the strips' result
        identical to the whole image's.
        """
        stored_frac, step = self.index_units.tolist()
        if stored_frac != self.index_frac or step <= 0:
            raise ValueError("hyper-synthesis changed since build_tables() (or no tables): rebuild the tables")
        offsets = self.index_offsets[self.table_level(quality)].view(1, -1, 1, 1).cpu()
        out = torch.empty((z_hat.shape[0], self.cfg.M, *size), dtype=torch.uint8)
        for r, acc in self._h_s_strips(z_hat, size, strip):
            index = torch.div(acc.to(torch.int64) + offsets + step // 2, step, rounding_mode="floor")
            out[:, :, r : r + acc.shape[2]] = index.clamp_(0, GaussianConditional.LEVELS - 1)
        return out

    @property
    def index_frac(self):
        """Fractional bits of the integer hyper-synthesis output (depends only on the weights)."""
        return weight_shift(self.h_s[-1]) + ACT_BITS

    def likelihoods(self, latents, quality):
        """Likelihoods of integer latents under the scales of their integer table indices, and of the side latents."""
        y_hat, z_hat = latents["y"], latents["z"]
        index = self.scale_index(z_hat, quality, y_hat.shape[-2:]).to(y_hat.device, torch.int64)
        scales = GaussianConditional.table_scales().to(y_hat.device, torch.float32)[index]
        return [self.gaussian.likelihood(y_hat, scales), self.prior.likelihood(z_hat)]

    def evaluate(self, x, quality):
        """Real-rounding pass (validation) with the coder's integer scale indices."""
        u = self.g_a(x)
        y_hat, z_hat = torch.round(self.scaled(u, quality)), self.side_latents(u)
        self.build_tables()  # the weights move during training: tables of the current ones
        per_sample = [self.likelihoods({"y": y_hat[i : i + 1], "z": z_hat[i : i + 1]}, float(q))
                      for i, q in enumerate(quality.tolist())]
        lik = [torch.cat(parts) for parts in zip(*per_sample)]
        return {"x_hat": self.g_s(y_hat * self.gains(quality)[1]), "likelihoods": lik}
