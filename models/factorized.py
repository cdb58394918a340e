"""The rate–distortion model with a factorized prior (Ballé et al. 2017), any rate from one checkpoint."""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from quantize import FactorizedPrior, ste_round
from models.base import LAMBDAS, CodingModel, copy_matching, distortion
from models.layers import GDN, down, subpixel_conv, up, widen


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


class RDModel(CodingModel):
    """Ballé-style factorized-prior codec with one learned gain vector per quality (any rate)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        n, m, k = cfg.N, cfg.M, cfg.kernel
        self.g_a = nn.Sequential(down(3, n, k), GDN(n), down(n, n, k), GDN(n),
                                 down(n, n, k), GDN(n), down(n, m, k))
        self.g_s = nn.Sequential(up(m, n, k), GDN(n, True), up(n, n, k), GDN(n, True),
                                 up(n, n, k), GDN(n, True), up(n, 3, k))
        nn.init.constant_(self.g_s[-1].bias, 0.5)  # start at mid-grey rather than black
        self.prior = FactorizedPrior(m)
        # High-rate theory: step ∝ 1/sqrt(λ); start the gains there so every quality trains at once.
        ref = LAMBDAS[len(LAMBDAS) // 2]
        log_gain = torch.tensor([0.5 * math.log(lam / ref) for lam in cfg.lambdas])
        self.log_gain = nn.Parameter(log_gain.view(-1, 1).repeat(1, m))
        self.log_igain = nn.Parameter(-log_gain.view(-1, 1).repeat(1, m))

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

    ENTROPY_MODULES = ("prior",)

    def forward(self, x, quality, noise=None):
        """Training pass: noisy latents for the rate, rounded (straight-through) ones for the decoder."""
        u = self.g_a(x)
        # Under mixed precision only the transforms run in bf16: a bf16 latent of 30 has a step of 0.125, too
        # coarse for the quantization noise, the means and the likelihoods, so the entropy model runs in fp32.
        with torch.autocast(x.device.type, enabled=False):
            out = self.entropy_forward(u.float(), quality, noise)
        x_hat = self.g_s(out.pop("y_hat") * self.gains(quality)[1].to(x.device))
        return {"x_hat": x_hat.float(), **out}

    def entropy_forward(self, u, quality, noise=None):
        """The entropy model's training pass on unscaled latents u: {"y_hat": rounded latents (straight through),
        "likelihoods": [...], "pixels": the image area they cover}."""
        g = self.gains(quality)[0].to(u.device)
        y = u * g
        _, likelihoods = self.prior(y, training=True, noise=noise, scale=g)
        return {"y_hat": ste_round(y), "likelihoods": [likelihoods], "pixels": self._pixels(u)}

    def _pixels(self, u):
        """Pixels covered by latents u (B, M, h, w): the rate is counted per pixel of the image."""
        return u.shape[-2] * u.shape[-1] * self.stride ** 2

    @torch.no_grad()
    def init_transforms(self, x, gain=12.0):
        """Start as an orthonormal colour + Haar wavelet codec fitted to sample crops x (B, 3, H, W).

        Each stride-2 layer begins as a 2×2 Haar step on the previous layer's most energetic outputs,
        keeping as many of the new sub-bands (largest energy on x first) as it has channels; the
        synthesis layers start as the exact adjoints (= inverses), GDNs as near-identity. The model
        thus codes like a wavelet codec at step 0 and training only has to improve on that, which on a
        CPU budget converges far faster than from random weights.
        """
        haar = torch.tensor([[[1, 1], [1, 1]], [[1, -1], [1, -1]], [[1, 1], [-1, -1]], [[1, -1], [-1, 1]]],
                            device=x.device) / 2.0
        colour = torch.tensor([[1, 1, 1], [1, -1, 0], [1, 1, -2]], device=x.device)
        colour = colour / torch.tensor([3, 2, 6], device=x.device).sqrt().view(3, 1)
        downs = [m for m in self.g_a if isinstance(m, nn.Conv2d)]
        ups = [m for m in self.g_s if isinstance(m, nn.ConvTranspose2d)][::-1]
        basis = torch.einsum("ij,bkl->bijkl", colour, haar)  # level 1: (band, colour, RGB, 2, 2)
        basis = basis.reshape(12, 3, 2, 2)
        inputs = list(range(3))  # meaningful input channels of the current layer
        h = x
        for conv, deconv in zip(downs, ups):
            k = conv.kernel_size[0] // 2
            cand = torch.zeros(len(basis) if conv is downs[0] else 4 * len(inputs), conv.in_channels, *conv.kernel_size,
                               device=x.device)
            if conv is downs[0]:
                cand[:, :, k : k + 2, k : k + 2] = basis
            else:
                for b in range(4):
                    for j, c in enumerate(inputs):
                        cand[b * len(inputs) + j, c, k : k + 2, k : k + 2] = haar[b]
            energy = F.conv2d(h, cand, stride=2, padding=k).pow(2).mean(dim=(0, 2, 3))
            keep = torch.argsort(energy, descending=True)[: conv.out_channels]
            weight = conv.weight.mul_(0.01)  # spare channels start small but alive (zero would stay zero)
            weight[: len(keep)] = cand[keep]
            conv.bias.zero_()
            deconv.weight.copy_(weight)
            deconv.bias.zero_()
            inputs = list(range(len(keep)))
            h = conv(h)
        for m in self.modules():
            if isinstance(m, GDN):
                m.beta.fill_(1.0)
                m.gamma.copy_(1e-3 * torch.eye(m.gamma.shape[0], device=x.device).view_as(m.gamma))
        log_gain = torch.log(torch.tensor(self.cfg.lambdas, device=x.device) / LAMBDAS[len(LAMBDAS) // 2]) * 0.5 + math.log(gain)
        self.log_gain.copy_(log_gain.view(-1, 1).expand_as(self.log_gain))
        self.log_igain.copy_(-log_gain.view(-1, 1).expand_as(self.log_igain))
        self.fit_prior(x)

    @torch.no_grad()
    def fit_prior(self, x):
        """Fit the entropy model alone to the latents of crops x (B, 3, H, W) at random qualities."""
        quality = 1 + torch.rand(len(x), device=x.device) * (self.num_qualities - 1)
        g = self.gains(quality)[0]
        y = self.g_a(x) * g
        with torch.enable_grad():
            return self.prior.fit(y.detach(), g.detach())

    def table_qualities(self):
        """The qualities that have stored entropy tables: 1, 1 + table_step, …, num_qualities."""
        n = round((self.num_qualities - 1) / self.cfg.table_step) + 1
        return torch.linspace(1, self.num_qualities, n)

    def table_level(self, quality):
        """Index of the stored table nearest to a quality (exact coding either way; off-grid costs a little rate)."""
        return round((float(quality) - 1) / self.cfg.table_step)

    def has_tables(self):
        """True once the integer entropy tables are built (or loaded)."""
        return self.prior.has_tables()

    def build_tables(self):
        """Integer entropy tables of every table quality, from the prior stretched by that quality's gains."""
        self.prior.build_tables(self.gains(self.table_qualities())[0].detach().squeeze(-1).squeeze(-1))

    def likelihoods(self, y_hat, quality):
        """Float likelihoods of integer latents (B, M, h, w) at a quality (the rate the model trains on), as a list."""
        return [self.prior.likelihood(y_hat, self.gains(quality)[0].to(y_hat.device))]

    def encode_latents(self, x, quality):
        """Image (1, 3, H, W) → integer-valued latents (1, M, H/16, W/16)."""
        return self.quantize_latents(self.g_a(x), quality)

    def quantize_latents(self, u, quality):
        """Unscaled analysis output u → integer-valued latents at a quality."""
        return torch.round(u * self.gains(quality)[0].to(u.device))

    def evaluate(self, x, quality):
        """Real-rounding pass (validation): reconstruction and the likelihoods the coder would use."""
        y_hat = self.encode_latents(x, quality)
        return {"x_hat": self.g_s(y_hat * self.gains(quality)[1]), "likelihoods": self.likelihoods(y_hat, quality)}

    def decode_latents(self, y_hat, quality):
        """Integer-valued latents → reconstructed image (unclamped)."""
        _, ig = self.gains(quality)
        h = self.g_s[:-1](y_hat * ig)
        return subpixel_conv(self.g_s[-1]).to(memory_format=torch.channels_last)(h)

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

    @torch.no_grad()  # not inference_mode: callers may edit the returned tensors
    def latents(self, u, quality):
        """The whole image's unscaled latents (M, h, w) → {"y": integer latents at the quality}."""
        return {"y": self.quantize_latents(u[None], quality)[0]}

    @torch.no_grad()
    def relaxed_latents(self, u, quality):
        """The latents before rounding (where effort.py's search starts)."""
        return {"y": (u[None] * self.gains(quality)[0].to(u.device))[0]}

    def synthesize(self, y, quality):
        """Tile of integer latents (1, M, h, w) → image (1, 3, 16h, 16w), unclamped."""
        return self.decode_latents(y, quality)

    def write_latents(self, latents, quality, encode):
        """Payload: every channel's symbols under the quality's table, then the escaped values."""
        return encode(self.prior.segments(latents["y"], self.table_level(quality)))

    def read_latents(self, payload, shape, quality, open_decoder):
        """Inverse of write_latents: {"y": latents (M, h, w)}."""
        return {"y": self.prior.read(open_decoder(payload), shape, self.table_level(quality))}

    @torch.no_grad()
    def estimated_bits(self, latents, quality):
        """Bits the (float) entropy model assigns to a latents dict: the rate the model trains on."""
        return float(sum(-torch.log2(lik).sum() for lik in self._likelihoods_of(latents, quality)))

    def _likelihoods_of(self, latents, quality):
        """Likelihoods of a latents dict (unbatched, on the CPU) on the model's device."""
        return self.likelihoods(latents["y"][None].to(self.log_gain.device), quality)

    # -- encoder search (effort.py)

    def rate_bits(self, latents, quality):
        """Bits of batched (rounded or relaxed) latents under the float entropy model; differentiable."""
        return -torch.log2(self.prior.likelihood(latents["y"], self.gains(quality)[0].to(latents["y"].device))).sum()

    def rd_cost(self, latents, x, quality, size, rounding=None):
        """bits per pixel + λ·255²·MSE over the image's own size (h, w) of batched latents, each quantized by
        `rounding` (effort.py's relaxed rounding; None: the latents are taken as they are), for the image
        x (1, 3, H, W) padded to the stride; differentiable."""
        if rounding is not None:
            latents = {k: rounding(v) for k, v in latents.items()}
        return self._rd(self.rate_bits(latents, quality), latents["y"], x, quality, size)

    def _rd(self, bits, y_hat, x, quality, size):
        """bits / pixels + λ·255²·MSE of the synthesis of y_hat against x over the image's own size."""
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
        """Copy every same-named, same-shaped tensor of another model (e.g. rd → hyper); the gain vectors are
        re-interpolated in log λ when the quality ladders differ. Returns the names skipped."""
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
