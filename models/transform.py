"""What the learned models share: a pair of GDN transforms and one learned gain vector per quality, so one
checkpoint codes at any rate. TransformCodec holds the quality ladder, the synthesis, the training loss and
the start of a run; each model file adds its entropy model (factorized.py, hyperprior.py, context.py)."""
import abc
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.base import LAMBDAS, CodingModel, copy_matching, distortion
from models.layers import GDN, down, subpixel_conv, up, wavelet_start, widen


class TransformCodec(CodingModel):
    """GDN analysis g_a and synthesis g_s (Ballé et al. 2017) with per-quality gains on the latents: quality q
    codes round(g_a(x) · gain(q)) and decodes g_s(ŷ · inverse gain(q)). Subclasses add the entropy model
    (after this __init__, so the parameter order of older checkpoints' optimizer states is kept)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.g_a, self.g_s = self.make_transforms(cfg)
        nn.init.constant_(self.g_s[-1].bias, 0.5)  # start at mid-grey rather than black
        # High-rate theory: step ∝ 1/sqrt(λ); start the gains there so every quality trains at once.
        ref = LAMBDAS[len(LAMBDAS) // 2]
        log_gain = torch.tensor([0.5 * math.log(lam / ref) for lam in cfg.lambdas])
        self.log_gain = nn.Parameter(log_gain.view(-1, 1).repeat(1, cfg.M))
        self.log_igain = nn.Parameter(-log_gain.view(-1, 1).repeat(1, cfg.M))

    def make_transforms(self, cfg):
        """(g_a, g_s): four stride-2 layers each (kernel cfg.kernel), GDN between; N hidden, M latent channels.
        The synthesis ends in its last transposed convolution (synthesize rewrites it as a sub-pixel one)."""
        n, m, k = cfg.N, cfg.M, cfg.kernel
        g_a = nn.Sequential(down(3, n, k), GDN(n), down(n, n, k), GDN(n), down(n, n, k), GDN(n), down(n, m, k))
        g_s = nn.Sequential(up(m, n, k), GDN(n, True), up(n, n, k), GDN(n, True), up(n, n, k), GDN(n, True), up(n, 3, k))
        return g_a, g_s

    @property
    def num_qualities(self):
        """Number of trained quality levels (the knob runs from 1 to this)."""
        return len(self.cfg.lambdas)

    def gains(self, quality):
        """Gain and inverse gain (B, M, 1, 1) for qualities in [1, Q], interpolated geometrically."""
        q = torch.as_tensor(quality, dtype=torch.float32, device=self.log_gain.device)
        q = q.reshape(-1).clamp(1, self.num_qualities) - 1
        lo = q.floor().long().clamp(max=self.num_qualities - 2)
        t = (q - lo).view(-1, 1)
        g = torch.lerp(self.log_gain[lo], self.log_gain[lo + 1], t).exp()
        ig = torch.lerp(self.log_igain[lo], self.log_igain[lo + 1], t).exp()
        return g[..., None, None], ig[..., None, None]

    def lmbda(self, quality):
        """λ for qualities in [1, Q], interpolated geometrically like the gains."""
        q = torch.as_tensor(quality, dtype=torch.float32).reshape(-1) - 1
        log_l = torch.log(torch.tensor(self.cfg.lambdas))
        lo = q.floor().long().clamp(0, self.num_qualities - 2)
        return torch.lerp(log_l[lo], log_l[lo + 1], q - lo).exp()

    def scaled(self, u, quality):
        """Unscaled analysis output u (B, M, h, w) times the quality's gains: the latents before rounding."""
        return u * self.gains(quality)[0].to(u.device)

    def forward(self, x, quality, noise=None):
        """Training pass: the entropy model's pass on g_a(x) (entropy_forward), then the synthesis of its ŷ."""
        u = self.g_a(x)
        # Under mixed precision only the analysis runs in bf16. A bf16 latent of 30 has a step of 0.125, too
        # coarse for the quantization noise, the means and the likelihoods, so the entropy model runs in fp32.
        # So does the synthesis: near 40 dB its bf16 output's rounding is as large as the residual the
        # distortion gradient follows, and its weights' gradients came out 4-7x further from fp32's than a
        # new draw of noise moves them (tools/amp_gradients.py; docs/training.md).
        with torch.autocast(x.device.type, enabled=False):
            out = self.entropy_forward(u.float(), quality, noise)
            x_hat = self.g_s(out.pop("y_hat") * self.gains(quality)[1].to(x.device))
        return {"x_hat": x_hat, **out}

    def _pixels(self, u):
        """Pixels covered by latents u (B, M, h, w): the rate is counted per pixel of the image."""
        return u.shape[-2] * u.shape[-1] * self.stride ** 2

    @torch.no_grad()
    def init_transforms(self, x, gain=12.0):
        """Start as an orthonormal colour + Haar wavelet codec fitted to sample crops x (B, 3, H, W)
        (layers.wavelet_start), gains from high-rate theory, then the entropy model fitted to the crops."""
        wavelet_start(self.g_a, self.g_s, x)
        log_gain = torch.log(torch.tensor(self.cfg.lambdas, device=x.device) / LAMBDAS[len(LAMBDAS) // 2]) * 0.5 + math.log(gain)
        self.log_gain.copy_(log_gain.view(-1, 1).expand_as(self.log_gain))
        self.log_igain.copy_(-log_gain.view(-1, 1).expand_as(self.log_igain))
        self.fit_prior(x)

    @abc.abstractmethod
    def fit_prior(self, x):
        """Fit the entropy model alone to crops x (B, 3, H, W); its bits per value."""

    def table_qualities(self):
        """The qualities that have stored entropy tables: 1, 1 + table_step, …, num_qualities."""
        n = round((self.num_qualities - 1) / self.cfg.table_step) + 1
        return torch.linspace(1, self.num_qualities, n)

    def table_level(self, quality):
        """Index of the stored table nearest to a quality (exact coding either way; off-grid costs a little rate)."""
        return round((float(quality) - 1) / self.cfg.table_step)

    # -- coding interface
    def rate_param(self, quality=None):
        """The header's rate field: quality × 100 (files store the 0.01 grid); default the highest quality;
        ValueError outside the trained range."""
        if quality is None:
            quality = self.num_qualities
        if not 1 <= quality <= self.num_qualities:
            raise ValueError(f"quality {quality} is outside this model's range 1 … {self.num_qualities}")
        return round(quality * 100)

    def quality_of(self, param):
        """Inverse of rate_param: the quality every other method takes; ValueError outside the range."""
        quality = param / 100
        if not 1 <= quality <= self.num_qualities:
            raise ValueError(f"quality {quality} outside 1 … {self.num_qualities}")
        return quality

    def ladder(self, qualities):
        """The rates a benchmark measures: the requested qualities."""
        return list(qualities)

    def analyse(self, x):
        """Image tile (1, 3, H, W) in [0, 1] → unscaled latents u (1, M, H/16, W/16)."""
        return self.g_a(x)

    def synthesize(self, y, quality):
        """Tile of integer latents (1, M, h, w) → image (1, 3, 16h, 16w), unclamped."""
        h = self.g_s[:-1](y * self.gains(quality)[1])
        return subpixel_conv(self.g_s[-1]).to(memory_format=torch.channels_last)(h)

    @torch.no_grad()
    def estimated_bits(self, latents, quality):
        """Bits the (float) entropy model assigns to a latents dict: the rate the model trains on."""
        return float(sum(-torch.log2(lik).sum() for lik in self._likelihoods_of(latents, quality)))

    def _likelihoods_of(self, latents, quality):
        """Likelihoods of a latents dict (unbatched, on the CPU) on the model's device."""
        return self.likelihoods({k: v[None].to(self.log_gain.device) for k, v in latents.items()}, quality)

    @abc.abstractmethod
    def likelihoods(self, latents, quality):
        """Float likelihoods, as a list, of a batch of one image's coded latents {"y": (1, M, h, w), …}."""

    def rd_cost(self, latents, x, quality, size, rounding=None):
        """bits per pixel + λ·255²·MSE over the image's own size (h, w) of batched latents, each quantized by
        `rounding` (effort.py's relaxed rounding; None: the latents are taken as they are), for the image
        x (1, 3, H, W) padded to the stride; differentiable."""
        if rounding is not None:
            latents = {k: rounding(v) for k, v in latents.items()}
        return self._rd(self.rate_bits(latents, quality), latents["y"], x, quality, size)

    def _rd(self, bits, y_hat, x, quality, size):
        """bits / pixels + λ·255²·MSE of the synthesis of y_hat against x over the image's own size (h, w)."""
        h, w = size
        x_hat = self.g_s(y_hat * self.gains(quality)[1].to(x.device))
        mse = F.mse_loss(x_hat[..., :h, :w], x[..., :h, :w])
        return bits / (h * w) + float(self.lmbda(quality)) * 255 ** 2 * mse

    @torch.no_grad()
    def settled(self, latents, quality):
        """A search's continuous latents (unbatched, on the CPU) → the latents the coder writes: rounded."""
        return {k: torch.round(v) for k, v in latents.items()}

    # -- training interface
    def draw_randomness(self, seeds, crop):
        """Per-sample quality and quantization noise of a batch, drawn from each sample's own seed.

        Keying randomness to the sample (not to the process) makes a resumed run, or the same global
        batch split over several processes, draw exactly the same numbers.
        """
        qualities, noise = [], []
        fixed = self.num_qualities == 2 and self.cfg.lambdas[0] == self.cfg.lambdas[1]
        for s in seeds.tolist():
            g = torch.Generator().manual_seed(int(s))
            q = torch.rand(1, generator=g)
            qualities.append(torch.ones(1) if fixed else 1 + q * (self.num_qualities - 1))
            noise.append(torch.rand(self.latent_shape(crop, crop), generator=g) - 0.5)
        return torch.cat(qualities), torch.stack(noise)

    def validation_qualities(self):
        """The qualities validation averages over: both ends and the middle."""
        return [1.0, 4.5, float(self.num_qualities)]

    def loss(self, x, out, quality):
        """λ·255²·MSE + bpp per sample, weighted so that every quality pulls equally; and the logged parts.
        Without a reconstruction (entropy_forward's output: x is then the latents) the rate alone."""
        bpp = sum(-torch.log2(lik).sum(dim=(1, 2, 3)) for lik in out["likelihoods"]) / out.get("pixels", x.shape[2] * x.shape[3])
        mse, parts = distortion(x, out["x_hat"]) if "x_hat" in out else (torch.zeros_like(bpp), {})
        lam = self.lmbda(quality).to(x.device)
        # Equalise the qualities' pull on the shared weights: high-λ samples would dominate the sum.
        weight = (lam / self.lmbda(torch.tensor(4.5)).to(x.device)).rsqrt()
        parts["bpp"] = bpp.mean().item()
        return (weight * (lam * 255 ** 2 * mse + bpp)).mean(), parts

    def initialise(self, crops):
        """Start of a fresh run: transforms as a colour + Haar wavelet codec fitted to the crops; what was done."""
        self.init_transforms(crops)
        return "transforms initialised as a colour + Haar wavelet codec fitted to 64 training crops"

    FIT_NOTE = ""  # what else refit does, for its message

    def refit(self, crops):
        """Fit the entropy model alone to training crops (a model started from another kind has none); what was done."""
        bits = self.fit_prior(crops)
        return f"entropy model fitted to {len(crops)} training crops ({bits:.3f} bits per value{self.FIT_NOTE})"

    @torch.no_grad()
    def adopt(self, source):
        """Copy every same-named, same-shaped tensor of another model (e.g. rd → hyper); narrower transforms are
        embedded (layers.widen); the gain vectors are re-interpolated in log λ when the quality ladders differ.
        Returns the names skipped."""
        skipped = copy_matching(source, self, skip=("log_gain", "log_igain"))
        if source.cfg.N < self.cfg.N and source.cfg.M == self.cfg.M:
            grown = widen(source.g_a, self.g_a, "g_a.") + widen(source.g_s, self.g_s, "g_s.")
            skipped = [k for k in skipped if k not in grown]
        old = torch.log(torch.tensor(source.cfg.lambdas))
        new = torch.log(torch.tensor(self.cfg.lambdas))
        i = (torch.searchsorted(old, new) - 1).clamp(0, len(old) - 2)  # segment, extrapolated at the ends
        t = ((new - old[i]) / (old[i + 1] - old[i])).view(-1, 1)
        for name in ("log_gain", "log_igain"):
            v = getattr(source, name)
            getattr(self, name).copy_(torch.lerp(v[i], v[i + 1], t.to(v)))
        return skipped
