"""The networks: the seed's ResNet auto-encoder and the rate–distortion (RD) model, one config each.

A checkpoint is one file `{kind, config, model, step, ...}`; `load_checkpoint` rebuilds the model
from it alone. This module imports only quantize.py (and torch / torchvision).
"""
import ctypes
import hashlib
import math
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from quantize import FactorizedPrior, GaussianConditional, quantize_bbit, ste_round

# CompressAI's λ for its qualities 1…8 (MSE): our quality knob uses the same numbering.
LAMBDAS = (0.0018, 0.0035, 0.0067, 0.0130, 0.0250, 0.0483, 0.0932, 0.1800)
# The hyperprior model's ladder starts lower (quality 1 lands under 0.1 bpp on Kodak) and steps ×2.33.
HYPER_LAMBDAS = tuple(round(0.0004 * 375 ** (i / 7), 5) for i in range(8))


# ----------------------------------------------------------------------------- seed model
@dataclass
class SeedConfig:
    """The seed's quantized auto-encoder: ResNet trunk → 512 sigmoid latents (stride 32) → B bits."""

    arch: str = "resnet101"  # resnet18 / resnet34 / resnet50 / resnet101
    latent_channels: int = 512
    bits: int = 8
    decoder_channels: tuple = (512, 256, 128, 64, 32)
    kind: str = "seed"

    @property
    def stride(self):
        """Total downsampling factor of the encoder."""
        return 32


class ResBlock(nn.Module):
    """Two 3×3 convolutions with a skip connection."""

    def __init__(self, ch):
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        """x + conv(relu(conv(x)))."""
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class SeedEncoder(nn.Module):
    """torchvision ResNet conv1 … layer4, then a 1×1 projection to the latent channels and a sigmoid."""

    def __init__(self, cfg):
        super().__init__()
        if cfg.arch not in ("resnet18", "resnet34", "resnet50", "resnet101"):
            raise ValueError(f"unknown ResNet trunk {cfg.arch!r}")
        net = getattr(torchvision.models, cfg.arch)(weights=None)
        self.trunk = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool,
                                   net.layer1, net.layer2, net.layer3, net.layer4)
        trunk_out = net.fc.in_features
        # BatchNorm keeps the pre-sigmoid values near N(0, 1): without it ReLU features of layer4
        # saturate the sigmoid and the encoder stops learning.
        self.project = nn.Sequential(nn.Conv2d(trunk_out, cfg.latent_channels, 1), nn.BatchNorm2d(cfg.latent_channels))

    def forward(self, x):
        """Image in [0, 1] → latents in (0, 1) at stride 32."""
        return torch.sigmoid(self.project(self.trunk(x)))


class SeedDecoder(nn.Module):
    """Custom residual upsampling network: five ×2 stages back to RGB in [0, 1]."""

    def __init__(self, cfg):
        super().__init__()
        chs = list(cfg.decoder_channels)
        layers = [nn.Conv2d(cfg.latent_channels, chs[0], 3, padding=1)]
        for i, ch in enumerate(chs):
            out = chs[i + 1] if i + 1 < len(chs) else chs[-1]
            layers += [ResBlock(ch), nn.Upsample(scale_factor=2, mode="nearest"),
                       nn.Conv2d(ch, out, 3, padding=1), nn.ReLU(inplace=True)]
        layers += [nn.Conv2d(chs[-1], 3, 3, padding=1), nn.Sigmoid()]
        self.net = nn.Sequential(*layers)

    def forward(self, v):
        """Dequantized latents → image in [0, 1]."""
        return self.net(v)


class SeedAutoEncoder(nn.Module):
    """The seed's quantized auto-encoder (no rate term: the rate is set by the latent size and B)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.encoder = SeedEncoder(cfg)
        self.decoder = SeedDecoder(cfg)

    def forward(self, x, mode="noise"):
        """Training pass: encode, quantize in the given quantize_bbit mode (noise by default), decode."""
        v = quantize_bbit(self.encoder(x), self.cfg.bits, mode)
        return {"x_hat": self.decoder(v)}

    def load_pretrained_trunk(self, path):
        """Initialise the encoder trunk from a local torchvision ResNet state_dict file."""
        state = torch.load(path, map_location="cpu", weights_only=True)
        names = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
        remap = {}
        for k, v in state.items():
            head = k.split(".")[0]
            if head in names:
                remap[f"{names.index(head)}{k[len(head):]}"] = v
        missing, _ = self.encoder.trunk.load_state_dict(remap, strict=False)
        if missing:
            raise ValueError(f"{path} is not a torchvision {self.cfg.arch} state_dict "
                             f"({len(missing)} trunk tensors missing)")


# ----------------------------------------------------------------------------- RD model
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
    def stride(self):
        """Total downsampling factor of the analysis transform."""
        return 16


class GDN(nn.Module):
    """Simplified (inverse) GDN of Johnston et al. 2019: x / (β + Σ γ|x|), cheap on a CPU."""

    def __init__(self, ch, inverse=False):
        super().__init__()
        self.inverse = inverse
        self.beta = nn.Parameter(torch.ones(ch))
        self.gamma = nn.Parameter(0.1 * torch.eye(ch).view(ch, ch, 1, 1))

    def forward(self, x):
        """Divisive (or, inverse, multiplicative) normalisation across channels."""
        # abs() keeps the parameters non-negative without a reparametrisation.
        # β is floored well above zero: a β that reaches ~0 divides by ~0 and blows training up.
        norm = F.conv2d(x.abs(), self.gamma.abs(), self.beta.abs().clamp_min(0.05))
        return x * norm if self.inverse else x / norm


def down(cin, cout, k):
    """Stride-2 convolution."""
    return nn.Conv2d(cin, cout, k, stride=2, padding=k // 2)


def up(cin, cout, k):
    """Stride-2 transposed convolution."""
    return nn.ConvTranspose2d(cin, cout, k, stride=2, padding=k // 2, output_padding=1)


def subpixel_conv(deconv):
    """The same map as a stride-2 transposed convolution (odd kernel, padding k // 2, output padding 1)
    written as a plain convolution to 4× the channels followed by a 2× pixel shuffle.

    Equal up to float rounding; oneDNN runs it ~25 % faster when the output has few channels (the
    synthesis's last layer, 80 → 3, measured on this CPU), and slower for wide outputs, so only the
    last layer uses it, rebuilt on every call so it never goes stale.
    """
    w, k, p = deconv.weight.detach(), deconv.kernel_size[0], deconv.padding[0]
    # Output row 2j + r takes input row j + e through kernel tap r + p − 2e.
    taps = [(r, e, r + p - 2 * e) for r in (0, 1) for e in range(-k, k + 1) if 0 <= r + p - 2 * e < k]
    reach = max(abs(e) for _, e, _ in taps)
    kernel = w.new_zeros(w.shape[1], 2, 2, w.shape[0], 2 * reach + 1, 2 * reach + 1)
    for r, e, i in taps:
        for s, f, j in taps:
            kernel[:, r, s, :, e + reach, f + reach] = w[:, :, i, j].T
    conv = nn.Conv2d(w.shape[0], 4 * w.shape[1], 2 * reach + 1, padding=reach).to(w.device)
    conv.weight.data = kernel.reshape(conv.weight.shape)
    conv.bias.data = deconv.bias.detach().repeat_interleave(4)
    return nn.Sequential(conv, nn.PixelShuffle(2))


class RDModel(nn.Module):
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

    def forward(self, x, quality, noise=None):
        """Training pass: noisy latents for the rate, rounded (straight-through) ones for the decoder."""
        g, ig = self.gains(quality)
        y = self.g_a(x) * g.to(x.device)
        _, likelihoods = self.prior(y, training=True, noise=noise, scale=g.to(x.device))
        x_hat = self.g_s(ste_round(y) * ig.to(x.device))
        return {"x_hat": x_hat, "likelihoods": [likelihoods]}

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


@dataclass
class HyperConfig(RDConfig):
    """RD model plus a scale hyperprior: H channels in the hyper transforms and the side latents z."""

    H: int = 64
    lambdas: tuple = HYPER_LAMBDAS
    kind: str = "hyper"


ACT_BITS = 8  # fractional bits of the integer hyper-synthesis' activations
ACT_MAX = float(1 << 22)  # activations are clamped here, so every sum stays an exact float64 integer
WEIGHT_BITS = 15  # integer weights have |w| < 2**15
STRIP_ROWS = 16  # rows of z per strip of the integer hyper-synthesis (64 latent rows)
INDEX_HALO = 2  # rows of z of context: h_s reaches 1 row of z (two 3×3 stride-2 deconvs, a 3×3 conv)
SIDE_HALO = 16  # rows of u of context for h_a, whose z rows see 4j − 7 … 4j + 7 (a multiple of 4 keeps the grid)


def weight_shift(layer):
    """Power of two that scales a layer's largest weight to just below 2**WEIGHT_BITS (exact: frexp)."""
    return WEIGHT_BITS - math.frexp(float(layer.weight.detach().abs().max()))[1]


def int_conv(layer, a, frac):
    """An integer version of a (transposed) convolution on integer activations a with `frac` fractional
    bits: returns (exact integer accumulator in float64, its fractional bits).

    Weights become integers below 2**15 by a power-of-two scale taken from their largest magnitude,
    all exact float operations, so every machine derives the same integers; sums of < 2**53 are exact
    in float64 whatever the summation order, thread count or device.
    """
    w = layer.weight.detach().to("cpu", torch.float64)
    shift = weight_shift(layer)
    w_int = torch.round(w * 2.0 ** shift)
    b_int = torch.round(layer.bias.detach().to("cpu", torch.float64) * 2.0 ** (shift + frac))
    if isinstance(layer, nn.ConvTranspose2d):
        acc = F.conv_transpose2d(a, w_int, b_int, layer.stride, layer.padding, layer.output_padding)
    else:
        acc = F.conv2d(a, w_int, b_int, layer.stride, layer.padding)
    return acc, shift + frac


class HyperModel(RDModel):
    """The RD model with a scale hyperprior (Ballé et al. 2018): side latents z = h_a(|u|) of the unscaled
    latents u, coded with a factorized prior, predict every latent's Gaussian scale through h_s.

    At coding time h_s runs as an integer network (int_conv) and the scale of each latent is an integer
    table index, so symbol probabilities are bit-identical on every machine. z does not depend on the
    quality; the quality's gain shifts the predicted log-scale per channel.
    """

    def __init__(self, cfg):
        super().__init__(cfg)
        m, h = cfg.M, cfg.H
        self.h_a = nn.Sequential(nn.Conv2d(m, h, 3, padding=1), nn.ReLU(), down(h, h, 5), nn.ReLU(), down(h, h, 5))
        self.h_s = nn.Sequential(up(h, h, 3), nn.ReLU(), up(h, h, 3), nn.ReLU(), nn.Conv2d(h, m, 3, padding=1))
        self.prior = FactorizedPrior(h)  # of z
        self.gaussian = GaussianConditional()
        # Per table quality and channel: log(gain) in the integer units of h_s' output; and those units'
        # fractional bits and the table step in them (see scale_index). Stored, so no libm call decides an index.
        self.register_buffer("index_offsets", torch.zeros(0, m, dtype=torch.int64))
        self.register_buffer("index_units", torch.zeros(2, dtype=torch.int64))

    def forward(self, x, quality, noise=None):
        """Training pass: noisy latents and side latents for the rate, rounded latents for the decoder."""
        g, ig = (t.to(x.device) for t in self.gains(quality))
        u = self.g_a(x)
        y = u * g
        z = self.h_a(u.abs())
        z_tilde, z_lik = self.prior(z, training=True)
        y_tilde = y + (noise if noise is not None else torch.rand_like(y) - 0.5)
        log_scale = self.h_s(z_tilde)[..., : y.shape[-2], : y.shape[-1]]  # z is rounded up in size
        y_lik = self.gaussian.likelihood(y_tilde, torch.exp(log_scale) * g)
        return {"x_hat": self.g_s(ste_round(y) * ig), "likelihoods": [y_lik, z_lik]}

    def side_shape(self, shape):
        """Shape of the side latents z for latents of shape (M, h, w): h_a halves each side twice, rounding up."""
        return (self.cfg.H, -(-shape[1] // 4), -(-shape[2] // 4))

    def side_latents(self, u, strip=4 * STRIP_ROWS):
        """Integer side latents z of the unscaled latents u (B, M, h, w), computed over strips of
        `strip` rows of u (a multiple of 4) with a halo, which bounds memory on large images."""
        h, parts = u.shape[2], []
        for r0 in range(0, h, strip):
            a, b = max(r0 - SIDE_HALO, 0), min(r0 + strip + SIDE_HALO, h)
            z = self.h_a(u[:, :, a:b].abs())
            parts.append(z[:, :, (r0 - a) // 4 : (r0 - a) // 4 + -(-min(strip, h - r0) // 4)])
        return torch.round(torch.cat(parts, 2))

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
        z = z_hat.detach().to("cpu", torch.float64).clamp(-ACT_MAX, ACT_MAX)
        out = torch.empty((z.shape[0], self.cfg.M, *size), dtype=torch.uint8)
        for r0 in range(0, z.shape[2], strip):
            a, b = max(r0 - INDEX_HALO, 0), min(r0 + strip + INDEX_HALO, z.shape[2])
            acc = self._int_h_s(z[:, :, a:b])[:, :, 4 * (r0 - a) : 4 * (r0 - a + strip)]
            rows = out[:, :, 4 * r0 : 4 * (r0 + strip)]
            index = torch.div(acc[..., : rows.shape[2], : size[1]].to(torch.int64) + offsets + step // 2, step,
                              rounding_mode="floor")
            rows.copy_(index.clamp_(0, GaussianConditional.LEVELS - 1))
        return out

    def _int_h_s(self, a):
        """The integer hyper-synthesis on integer float64 side latents: exact output accumulator (float64)."""
        frac = 0
        convs = [layer for layer in self.h_s if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d))]
        for layer in convs[:-1]:
            acc, frac = int_conv(layer, a, frac)
            a, frac = torch.floor(acc.clamp_min(0) * 2.0 ** (ACT_BITS - frac)).clamp_max(ACT_MAX), ACT_BITS
        return int_conv(convs[-1], a, frac)[0]

    @property
    def index_frac(self):
        """Fractional bits of the integer hyper-synthesis output (depends only on the weights)."""
        return weight_shift(self.h_s[-1]) + ACT_BITS

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

    def likelihoods(self, y_hat, quality, z_hat):
        """Likelihoods of integer latents under the scales of their integer table indices, and of z_hat."""
        index = self.scale_index(z_hat, quality, y_hat.shape[-2:]).to(y_hat.device, torch.int64)
        scales = GaussianConditional.table_scales().to(y_hat.device, torch.float32)[index]
        return [self.gaussian.likelihood(y_hat, scales), self.prior.likelihood(z_hat)]

    def evaluate(self, x, quality):
        """Real-rounding pass (validation) with the coder's integer scale indices."""
        g, ig = self.gains(quality)
        u = self.g_a(x)
        y_hat, z_hat = torch.round(u * g), self.side_latents(u)
        self.build_tables()  # the weights move during training: tables of the current ones
        per_sample = [self.likelihoods(y_hat[i : i + 1], float(q), z_hat[i : i + 1]) for i, q in enumerate(quality.tolist())]
        lik = [torch.cat(parts) for parts in zip(*per_sample)]
        return {"x_hat": self.g_s(y_hat * ig), "likelihoods": lik}

    @torch.no_grad()
    def fit_prior(self, x):
        """Start the entropy model on crops x: h_s as per-channel Gaussians (zero last-layer weights,
        bias = log std of u), z scaled to a std of 2, then z's prior fitted alone; returns z's bits per value."""
        u = self.g_a(x)
        last = self.h_s[-1]
        last.weight.zero_()
        last.bias.copy_(u.std(dim=(0, 2, 3)).clamp_min(1e-3).log())
        # A random h_a gives |z| ≪ 1/2 on these small latents, so every z would round to 0 and the
        # hyperprior would stay closed (measured: it did for 600 steps); start z with a std of 2.
        z = self.h_a(u.abs())
        last = self.h_a[-1]
        scale = 2.0 / z.std().clamp_min(1e-6)
        last.weight.mul_(scale)
        last.bias.mul_(scale)
        with torch.enable_grad():
            return self.prior.fit(z * scale)


# ----------------------------------------------------------------------------- checkpoints
KINDS = {"seed": (SeedConfig, SeedAutoEncoder), "rd": (RDConfig, RDModel), "hyper": (HyperConfig, HyperModel)}


def build_model(config):
    """Model from a config dict (as stored in checkpoints) or a config dataclass."""
    if not isinstance(config, dict):
        config = asdict(config)
    kind = config.get("kind")
    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}")
    cfg_cls, model_cls = KINDS[kind]
    known = cfg_cls.__dataclass_fields__
    cfg = cfg_cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in known})
    return model_cls(cfg)


def model_id(state_dict):
    """Short identity of a set of weights (and tables): first 4 bytes of a SHA-256 over all tensors."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(t.to(torch.float32).numpy().tobytes() if t.is_floating_point() else t.numpy().tobytes())
    return h.digest()[:4]


INT8_SCALE = ".int8_scale"  # suffix of the per-channel scale stored beside an int8 weight


def pack_state(state, precision="fp32"):
    """Weights as stored in a file: fp32, fp16, or int8 with an fp16 scale per output channel.

    int8 applies to weight tensors of 4096+ values (convolutions); the rest stays fp16. It halves the
    ResNet seed checkpoint again (fp16 would exceed 100 MB) for a loss the README reports.
    """
    out = {}
    for k, v in state.items():
        if not v.is_floating_point() or precision == "fp32":
            out[k] = v
        elif precision == "int8" and v.dim() >= 2 and v.numel() >= 4096:
            scale = v.abs().amax(dim=tuple(range(1, v.dim())), keepdim=True).clamp_min(1e-12) / 127
            out[k] = torch.round(v / scale).to(torch.int8)
            out[k + INT8_SCALE] = scale.half()
        else:
            out[k] = v.half()
    return out


def unpack_state(state):
    """Inverse of pack_state: every floating tensor (and int8 weight) back to float32."""
    out = {}
    for k, v in state.items():
        if k.endswith(INT8_SCALE):
            continue
        if v.dtype == torch.int8 and k + INT8_SCALE in state:
            out[k] = v.float() * state[k + INT8_SCALE].float()
        else:
            out[k] = v.float() if v.is_floating_point() else v
    return out


def save_checkpoint(path, model, precision="fp32", **extra):
    """Write {kind, config, model, model_id, **extra} atomically (temp file, then rename)."""
    state = pack_state({k: v.detach().cpu() for k, v in model.state_dict().items()}, precision)
    ckpt = {"kind": model.cfg.kind, "config": asdict(model.cfg), "model": state, "precision": precision,
            "model_id": model_id(state).hex(), **extra}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(ckpt, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def keep_freed_memory():
    """Let glibc keep freed memory for the next tensor instead of unmapping it (Linux; else a no-op).

    By default each large block is a fresh mmap, so every big activation of a network pays a page
    fault per 4 KiB page on first touch: measured on this project's 2-core VM, that cost a Kodak
    decode ~40 % of its time. Returns whether the setting took.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # mallopt parameter numbers from <malloc.h>
    mmap_ok = any(libc.mallopt(m_mmap_threshold, v) for v in (1 << 30, 1 << 25))  # glibcs differ in the max
    return bool(mmap_ok and libc.mallopt(m_trim_threshold, 1 << 30))


def resolve_device(name):
    """torch.device for a --device flag, or ValueError saying why it cannot be used here."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r}: not a device name (use cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"--device {name}: no CUDA device is available")
        if (device.index or 0) >= count:
            raise ValueError(f"--device {name}: there are only {count} CUDA device(s)")
    return device


def load_checkpoint(path, device="cpu"):
    """Rebuild the model from a checkpoint file alone; returns (model in eval mode, checkpoint dict)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:
        raise ValueError(f"{path}: not a readable checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or "config" not in ckpt or "model" not in ckpt:
        raise ValueError(f"{path}: not a checkpoint of this project (no config / model)")
    model = build_model(ckpt["config"])
    if isinstance(model, RDModel):
        if "prior.starts" not in ckpt["model"] and ckpt["kind"] == "rd":  # one shared table (old): rebuild
            ckpt["model"] = {k: v for k, v in ckpt["model"].items() if k.split(".")[-1] not in ("freqs", "offsets", "lengths")}
        # Tables are empty buffers until built; size them to what the file holds.
        for name, buf in list(model.named_buffers()):
            owner, _, attr = name.rpartition(".")
            if name in ckpt["model"] and buf.numel() == 0:
                setattr(model.get_submodule(owner), attr, torch.zeros_like(ckpt["model"][name]))
    state = unpack_state(ckpt["model"])
    if isinstance(model, RDModel):
        state.update({k: v for k, v in model.named_buffers() if k not in state})  # tables not built yet
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{path}: weights do not fit the config ({str(e).splitlines()[0]})") from None
    ckpt.setdefault("model_id", model_id(ckpt["model"]).hex())
    return model.to(device).eval(), ckpt
