"""The rate–distortion model with a factorized prior (Ballé et al. 2017), any rate from one checkpoint."""
from dataclasses import dataclass

import torch

from quantize import FactorizedPrior, ste_round
from models.base import LAMBDAS
from models.transform import TransformCodec


@dataclass
class RDConfig:
    """Rate–distortion model: GDN transforms, factorized prior, per-quality gain vectors."""

    N: int = 80  # hidden channels: 80 runs ~2× faster than 96 on oneDNN CPUs (measured, 768×512)
    M: int = 192  # latent channels
    kernel: int = 5
    lambdas: tuple = LAMBDAS
    table_step: float = 0.25  # entropy tables are stored for qualities 1, 1.25, …; others use the nearest
    kind: str = "rd"

    @property
    def latent_channels(self):
        """Channels of the latents y (the name every config shares)."""
        return self.M

    @property
    def stride(self):
        """Total downsampling factor of the analysis transform."""
        return 16


class RDModel(TransformCodec):
    """Ballé-style factorized-prior codec with one learned gain vector per quality (any rate): every latent
    channel has its own learned density, stretched by the quality's gain."""

    ENTROPY_MODULES = ("prior",)

    def __init__(self, cfg):
        super().__init__(cfg)
        self.prior = FactorizedPrior(cfg.M)

    def entropy_forward(self, u, quality, noise=None):
        """The entropy model's training pass on unscaled latents u: {"y_hat": rounded latents (straight through),
        "likelihoods": [...], "pixels": the image area they cover}."""
        g = self.gains(quality)[0].to(u.device)
        y = u * g
        _, likelihoods = self.prior(y, training=True, noise=noise, scale=g)
        return {"y_hat": ste_round(y), "likelihoods": [likelihoods], "pixels": self._pixels(u)}

    @torch.no_grad()
    def fit_prior(self, x):
        """Fit the entropy model alone to the latents of crops x (B, 3, H, W) at random qualities."""
        quality = 1 + torch.rand(len(x), device=x.device) * (self.num_qualities - 1)
        g = self.gains(quality)[0]
        y = self.g_a(x) * g
        with torch.enable_grad():
            return self.prior.fit(y.detach(), g.detach())

    def has_tables(self):
        """True once the integer entropy tables are built (or loaded)."""
        return self.prior.has_tables()

    def build_tables(self):
        """Integer entropy tables of every table quality, from the prior stretched by that quality's gains."""
        self.prior.build_tables(self.gains(self.table_qualities())[0].detach().squeeze(-1).squeeze(-1))

    def likelihoods(self, latents, quality):
        """Float likelihoods of integer latents {"y": (B, M, h, w)} at a quality (the rate the model trains on)."""
        y = latents["y"]
        return [self.prior.likelihood(y, self.gains(quality)[0].to(y.device))]

    def evaluate(self, x, quality):
        """Real-rounding pass (validation): reconstruction and the likelihoods the coder would use."""
        y_hat = torch.round(self.scaled(self.g_a(x), quality))
        return {"x_hat": self.g_s(y_hat * self.gains(quality)[1]), "likelihoods": self.likelihoods({"y": y_hat}, quality)}

    # -- coding interface
    @torch.no_grad()  # not inference_mode: callers may edit the returned tensors
    def latents(self, u, quality):
        """A coding tile's unscaled latents (M, h, w) → {"y": integer latents at the quality}."""
        return {"y": torch.round(self.scaled(u[None], quality))[0]}

    @torch.no_grad()
    def relaxed_latents(self, u, quality):
        """The latents before rounding (where effort.py's search starts)."""
        return {"y": self.scaled(u[None], quality)[0]}

    def write_latents(self, latents, quality, encode):
        """Payload: every channel's symbols under the quality's table, then the escaped values."""
        return encode(self.prior.segments(latents["y"], self.table_level(quality)))

    def read_latents(self, payload, shape, quality, open_decoder):
        """Inverse of write_latents: {"y": latents (M, h, w)}."""
        return {"y": self.prior.read(open_decoder(payload), shape, self.table_level(quality))}

    # -- encoder search (effort.py)
    def rate_bits(self, latents, quality):
        """Bits of batched (rounded or relaxed) latents under the float entropy model; differentiable."""
        return -torch.log2(self.likelihoods(latents, quality)[0]).sum()
