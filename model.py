"""The networks and their configs: the seed's ResNet auto-encoder, the rate–distortion (rd) model, its
hyperprior variant (hyper) and the context model (ctx).

Every model class offers the same coding interface, which is all that codec.py and train.py use:

  stride, latent_shape(h, w)           geometry of the latents
  rate_param(quality) / quality_of(p)  the user's rate setting checked and normalised ↔ the header's integer
  analyse(x) → u                       one image tile → analysis output (codec.py tiles large images)
  latents(u, quality) → dict           the whole image's analysis output → integer latents {"y", …}
  synthesize(y, quality) → x           one tile of integer latents → image (unclamped)
  write_latents(latents, quality, encode) / read_latents(payload, shape, quality, open_decoder)
                                       latents ↔ payload bytes; the entropy coder is passed in
  estimated_bits(latents, quality)     the rate the model's own entropy model assigns
  ladder(qualities)                    the rates a benchmark measures the model at
  relaxed_latents, rate_bits, rd_cost, settled, SIDE_KEYS
                                       what effort.py's encoder search needs (the seed refuses one)

and for training: forward, evaluate, loss, draw_randomness, validation_qualities, initialise,
refit, adopt, build_tables / has_tables, and entropy_forward / freeze_transforms (train.py
--entropy-only). This module imports only quantize.py (and torch / torchvision); checkpoint files are
checkpoint.py's.
"""
import math
import struct
from dataclasses import asdict, dataclass

import numpy as np

import torch
import torch.nn as nn
import torch.nn.functional as F

from quantize import (PRECISION, DecodeError, FactorizedPrior, GaussianConditional, escape_segments, pmf_to_freqs,
                      quantize_bbit,
                      read_escapes, read_sparse, sparse_segments, ste_round)

# CompressAI's λ for its qualities 1…8 (MSE): our quality knob uses the same numbering.
LAMBDAS = (0.0018, 0.0035, 0.0067, 0.0130, 0.0250, 0.0483, 0.0932, 0.1800)


def geometric_ladder(low, top, n=8):
    """n λs from low to top with equal ratios between neighbours (5 decimals, as stored in configs)."""
    if not top > low:
        raise ValueError(f"the top λ must exceed the lowest, {low}")
    return tuple(round(low * (top / low) ** (i / (n - 1)), 5) for i in range(n))


# The hyperprior model's ladder starts lower (quality 1 lands under 0.1 bpp on Kodak) and steps ×2.33.
HYPER_LAMBDAS = geometric_ladder(0.0004, 0.15)


def distortion(x, x_hat):
    """Per-sample MSE of a reconstruction, and the logged parts {mse, psnr} (batch means)."""
    mse = F.mse_loss(x_hat, x, reduction="none").mean(dim=(1, 2, 3))
    return mse, {"mse": mse.mean().item(), "psnr": (-10 * torch.log10(mse.clamp_min(1e-10))).mean().item()}


@torch.no_grad()
def copy_matching(source, model, skip=()):
    """Copy every same-named, same-shaped tensor of source into model (except `skip`); the names whose shape differs."""
    target = model.state_dict()
    for k, v in source.state_dict().items():
        if k in target and target[k].shape == v.shape and k not in skip:
            target[k].copy_(v)
    # An empty target is an unbuilt table (build_tables makes it for the new weights): not worth a mention.
    return [k for k, v in source.state_dict().items() if k in target and target[k].shape != v.shape and target[k].numel()]


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
        import torchvision  # here, not at the top: importing it costs ~1 s that only the seed model needs

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


class CodingModel(nn.Module):
    """Base of every model: the geometry of its latents (the rest of the coding interface is per model,
    see the module docstring)."""

    SHIP_PRECISION = "fp32"  # how train.py stores the shippable checkpoint (checkpoint.pack_state)

    ENTROPY_MODULES = ()  # the entropy model's submodules: what train.py --entropy-only trains

    INTEGER_NETWORKS = ()  # methods running the integer networks the coding calls (tools/coding_report.py clocks them)

    def param_groups(self):
        """The optimizer's parameter groups; a group's "lr_scale" multiplies the run's learning rate."""
        return [{"params": list(self.parameters())}]

    def freeze_transforms(self):
        """Leave only the entropy model trainable (train.py --entropy-only); ValueError when there is none."""
        if not self.ENTROPY_MODULES:
            raise ValueError(f"the {self.cfg.kind} model has no learned entropy model to train alone")
        for name, p in self.named_parameters():
            p.requires_grad_(name.startswith(tuple(m + "." for m in self.ENTROPY_MODULES)))

    def entropy_forward(self, u, quality, noise=None):
        """The entropy model's training pass on the analysis output u (models that have one)."""
        raise ValueError(f"the {self.cfg.kind} model has no learned entropy model to train alone")

    @property
    def stride(self):
        """Pixels per latent along each side."""
        return self.cfg.stride

    def latent_shape(self, height, width):
        """Shape (C, h, w) of the latents of an image (padded up to a multiple of the stride)."""
        return (self.cfg.latent_channels, -(-height // self.stride), -(-width // self.stride))


class SeedAutoEncoder(CodingModel):
    """The seed's quantized auto-encoder (no rate term: the rate is set by the latent size and B)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.encoder = SeedEncoder(cfg)
        self.decoder = SeedDecoder(cfg)

    SHIP_PRECISION = "int8"  # a ResNet-101 checkpoint in fp16 would pass 100 MB

    def forward(self, x, quality=None, noise=None, mode="noise"):
        """Training pass: encode, quantize in the given quantize_bbit mode (noise by default), decode."""
        v = quantize_bbit(self.encoder(x), self.cfg.bits, mode)
        return {"x_hat": self.decoder(v)}

    # -- coding interface
    def rate_param(self, quality=None):
        """The header's rate field: B. The seed has no quality knob: its rate is set by the latent size and B."""
        if quality is not None:
            raise ValueError(f"the seed model has no quality setting (its rate is fixed by B = {self.cfg.bits} "
                             "bits per latent); leave --quality out")
        return self.cfg.bits

    def quality_of(self, param):
        """Inverse of rate_param (None); ValueError when the file's B is not this model's."""
        if param != self.cfg.bits:
            raise ValueError(f"B = {param}, model has B = {self.cfg.bits}")
        return None

    def ladder(self, qualities):
        """The rates a benchmark measures: the seed has one."""
        return [None]

    def analyse(self, x):
        """Image tile (1, 3, H, W) in [0, 1] → integer symbols 0 … 2**B (1, C, H/32, W/32)."""
        return quantize_bbit(self.encoder(x), self.cfg.bits, "symbols")

    def latents(self, u, quality=None):
        """The whole image's symbols (C, h, w) → latents dict."""
        return {"y": u}

    def synthesize(self, y, quality=None):
        """Tile of symbols (1, C, h, w) → image (1, 3, 32h, 32w), unclamped."""
        return self.decoder(quantize_bbit(y, self.cfg.bits, "dequantize"))

    def _table(self, symbols):
        """Per-image static frequency table over the symbol range actually used: (lo, freqs)."""
        counts = np.bincount(symbols.ravel(), minlength=2 ** self.cfg.bits + 1)
        used = np.nonzero(counts)[0]
        lo, hi = int(used[0]), int(used[-1])
        return lo, pmf_to_freqs(counts[lo : hi + 1])

    def write_latents(self, latents, quality, encode):
        """Payload: the table (lo, n, freqs − 1 as u16), then encode() of the symbols under it."""
        symbols = latents["y"].numpy()
        lo, freqs = self._table(symbols)
        table = struct.pack(">HH", lo, len(freqs)) + (freqs - 1).astype(">u2").tobytes()
        return table + encode([(symbols.ravel() - lo, freqs)])

    def read_latents(self, payload, shape, quality, open_decoder):
        """Inverse of write_latents: {"y": int32 symbols (C, h, w)}; DecodeError for a bad table."""
        if len(payload) < 4:
            raise DecodeError("payload truncated (no frequency table)")
        lo, n = struct.unpack_from(">HH", payload)
        if n == 0 or lo + n > 2 ** self.cfg.bits + 1 or len(payload) < 4 + 2 * n:
            raise DecodeError("payload corrupted (bad frequency table)")
        freqs = np.frombuffer(payload, ">u2", n, 4).astype(np.int64) + 1
        if freqs.sum() != 1 << PRECISION:
            raise DecodeError("payload corrupted (frequency table does not sum to 2^16)")
        s = open_decoder(payload[4 + 2 * n :]).take(freqs, int(np.prod(shape)))
        return {"y": torch.from_numpy((s + lo).reshape(shape))}

    def estimated_bits(self, latents, quality=None):
        """Bits of the symbols under their own per-image table (the table itself not counted)."""
        lo, freqs = self._table(latents["y"].numpy())
        counts = np.bincount(latents["y"].numpy().ravel() - lo, minlength=len(freqs))
        return float(-(counts * np.log2(freqs / 2.0 ** PRECISION)).sum())

    def relaxed_latents(self, u, quality=None):
        """The seed's latents are its symbols: nothing to search."""
        return self.latents(u, quality)

    SIDE_KEYS = ()  # latents that change only the rate (effort.py searches them without the synthesis)

    def rd_cost(self, latents, x, quality, size, rounding=None):
        """The seed has no rate term to trade against distortion: no encoder search (effort 0 only)."""
        raise ValueError("the seed model has no rate–distortion cost to search: it codes at effort 0 only")

    def has_tables(self):
        """Always: the seed's table is made per image and stored in the file."""
        return True

    def build_tables(self):
        """Nothing to build (see has_tables)."""

    # -- training interface
    def draw_randomness(self, seeds, crop):
        """Per-sample (quality, noise) of a training batch: the seed has neither."""
        return None, None

    def validation_qualities(self):
        """The rates validation averages over: the seed's one."""
        return [None]

    def evaluate(self, x, quality=None):
        """Validation pass with the coder's rounding."""
        return self.forward(x, mode="ste")

    def loss(self, x, out, quality=None):
        """Training objective (MSE) and its logged parts."""
        mse, parts = distortion(x, out["x_hat"])
        return mse.mean(), parts

    def initialise(self, crops):
        """Start of a fresh run: the trunk's initialisation is train.py's (--pretrained); nothing to fit."""
        return None

    def refit(self, crops):
        """No entropy model to fit."""
        return None

    @torch.no_grad()
    def adopt(self, source):
        """Copy every same-named, same-shaped tensor of another checkpoint's model; returns the names skipped."""
        return copy_matching(source, self)

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
    def latent_channels(self):
        """Channels of the latents y (the name every config shares)."""
        return self.M

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


@torch.no_grad()
def widen(narrow, wide, prefix=""):
    """Embed a transform into a wider copy of itself (Net2Net-style) so that the wide one computes the same map:
    the narrow weights fill the leading channels, the weights from the new channels into the old ones are zero,
    and the new channels keep their fresh initialisation (their outputs are not read yet, but they learn).
    Returns the names of the parameters embedded."""
    names = []
    for i, (a, b) in enumerate(zip(narrow, wide)):
        if isinstance(a, GDN):
            pairs, inputs = [(a.gamma, b.gamma), (a.beta, b.beta)], 1
        elif isinstance(a, (nn.Conv2d, nn.ConvTranspose2d)):
            pairs, inputs = [(a.weight, b.weight), (a.bias, b.bias)], 0 if isinstance(a, nn.ConvTranspose2d) else 1
        else:
            continue
        weight = pairs[0][1]
        if any(s > t for s, t in zip(pairs[0][0].shape, weight.shape)) or pairs[0][0].shape[2:] != weight.shape[2:]:
            raise ValueError(f"layer {i} of the source is not narrower than the target's ({tuple(pairs[0][0].shape)} "
                             f"vs {tuple(weight.shape)})")
        old_in = pairs[0][0].shape[inputs]
        outputs = 1 - inputs
        silence = [slice(None)] * 2
        silence[inputs], silence[outputs] = slice(old_in, None), slice(0, pairs[0][0].shape[outputs])
        weight[tuple(silence)] = 0  # the new channels do not reach the old ones
        for src, dst in pairs:
            dst[tuple(slice(0, n) for n in src.shape)] = src
        names += [f"{prefix}{i}.{n}" for n in (("gamma", "beta") if isinstance(a, GDN) else ("weight", "bias"))]
    return names


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
    SIDE_KEYS = ()  # latents that change only the rate, searched without the synthesis

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


def convs_of(seq):
    """The (transposed) convolutions of a sequential network, in order (its ReLUs are implied)."""
    return [layer for layer in seq if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d))]


def int_net(convs, a, frac):
    """An integer network: int_conv layer after layer, each hidden output through ReLU and floored to
    ACT_BITS fractional bits; returns the last layer's exact accumulator (float64) and its fractional bits."""
    for layer in convs[:-1]:
        acc, f = int_conv(layer, a, frac)
        a, frac = torch.floor(acc.clamp_min(0) * 2.0 ** (ACT_BITS - f)).clamp_max(ACT_MAX), ACT_BITS
    return int_conv(convs[-1], a, frac)


def fixed_point(acc, frac, bits):
    """An exact accumulator with `frac` fractional bits, floored to `bits` fractional bits (exact: powers of two)."""
    return torch.floor(acc * 2.0 ** (bits - frac))


# Latents whose scale index is below SPARSE_LEVELS (scale 0.11) are ~40 % of a Kodak image's at
# quality 4 and nearly all zero (measured: 1 in 100 … 3,000 is ±1): they are coded as the positions
# and values of their few nonzeros, not one coder symbol each, which saves that share of the
# decoding time and, measured, no bytes (files equal or smaller than one symbol each).
SPARSE_LEVELS = 1


def take_sparse(counts):
    """Number of the sparse-coded latents (the first SPARSE_LEVELS groups); their counts are zeroed in place,
    since they are not coded one symbol each under the Gaussian tables."""
    n = int(counts[:SPARSE_LEVELS].sum())
    counts[:SPARSE_LEVELS] = 0
    return n


def scale_groups(index):
    """Order that groups latents by their integer scale index (uint8 tensor, any shape), and the count per index."""
    # A stable sort's order is unique, so torch's (parallel, radix) sort gives every machine the same groups.
    levels, order = torch.sort(index.reshape(-1), stable=True)
    bounds = np.searchsorted(levels.numpy(), np.arange(GaussianConditional.LEVELS + 1, dtype=levels.numpy().dtype))
    return order.numpy(), np.diff(bounds)


def scale_segments(gaussian, values, index):
    """Coder segments of integer values (numpy, any shape) under the Gaussian tables of their scale index: the
    smallest-scale ones sparsely, the others grouped by index under their tables, then the escaped values."""
    order, counts = scale_groups(index)
    grouped, n_sparse = values.reshape(-1)[order], take_sparse(counts)
    sym, escaped = gaussian.to_symbols(grouped[n_sparse:], counts)
    groups = np.split(sym, np.cumsum(counts)[:-1])
    return sparse_segments(grouped[:n_sparse]) + list(zip(groups, gaussian.tables())) + escape_segments(escaped)


def read_scaled(gaussian, dec, index):
    """Inverse of scale_segments: the values (float32 numpy, index's shape) from a SymbolDecoder."""
    order, counts = scale_groups(index)
    n_sparse = take_sparse(counts)
    y = np.zeros(len(order), np.float32)
    positions, values = read_sparse(dec, n_sparse)
    y[order[positions]] = values
    symbols = np.concatenate([dec.take(t, int(n)) for t, n in zip(gaussian.tables(), counts)])
    y[order[n_sparse:]] = gaussian.from_symbols(symbols, counts, lambda count: read_escapes(dec, count))
    return y.reshape(index.shape)


class HyperModel(RDModel):
    """The RD model with a scale hyperprior (Ballé et al. 2018): side latents z = h_a(|u|) of the unscaled
    latents u, coded with a factorized prior, predict every latent's Gaussian scale through h_s.

    At coding time h_s runs as an integer network (int_conv) and the scale of each latent is an integer
    table index, so symbol probabilities are bit-identical on every machine. z does not depend on the
    quality; the quality's gain shifts the predicted log-scale per channel.
    """

    FIT_NOTE = ", hyperprior started as per-channel Gaussians"
    INTEGER_NETWORKS = ("scale_index",)

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

    ENTROPY_MODULES = ("prior", "h_a", "h_s")

    def entropy_forward(self, u, quality, noise=None):
        """The entropy model's training pass on unscaled latents u: {"y_hat": rounded latents (straight through),
        "likelihoods": [latents, side latents], "pixels": the image area they cover}."""
        g = self.gains(quality)[0].to(u.device)
        y = u * g
        z_tilde, z_lik = self.prior(self.h_a(self.hyper_input(u)), training=True)
        y_tilde = y + (noise if noise is not None else torch.rand_like(y) - 0.5)
        log_scale = self.h_s(z_tilde)[..., : y.shape[-2], : y.shape[-1]]  # z is rounded up in size
        y_lik = self.gaussian.likelihood(y_tilde, torch.exp(log_scale) * g)
        return {"y_hat": ste_round(y), "likelihoods": [y_lik, z_lik], "pixels": self._pixels(u)}

    @torch.no_grad()  # not inference_mode: callers may edit the returned tensors
    def latents(self, u, quality):
        """The whole image's unscaled latents (M, h, w) → {"y": integer latents, "z": integer side latents}.
        h_a runs on the whole latent image (1/16 of the pixels), in strips (side_latents), not in tiles."""
        return {"y": self.quantize_latents(u[None], quality)[0], "z": self.side_latents(u[None])[0]}

    @torch.no_grad()
    def relaxed_latents(self, u, quality):
        """The latents and side latents before rounding (where effort.py's search starts)."""
        return {"y": (u[None] * self.gains(quality)[0].to(u.device))[0], "z": self.side_latents(u[None], rounded=False)[0]}

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

    def _likelihoods_of(self, latents, quality):
        """Likelihoods of a latents dict (unbatched, on the CPU) on the model's device."""
        device = self.log_gain.device
        return self.likelihoods(latents["y"][None].to(device), quality, latents["z"][None].to(device))

    SIDE_KEYS = ("z",)

    def rate_bits(self, latents, quality):
        """Bits of batched latents and side latents under the Gaussians the float h_s predicts (coding uses the
        integer h_s, which agrees to within one table level); differentiable."""
        y, z = latents["y"], latents["z"]
        log_scale = self.h_s(z)[..., : y.shape[-2], : y.shape[-1]]
        scale = torch.exp(log_scale) * self.gains(quality)[0].to(y.device)
        return -torch.log2(self.gaussian.likelihood(y, scale)).sum() - torch.log2(self.prior.likelihood(z)).sum()

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

    def _h_s_strips(self, z_hat, size, strip=STRIP_ROWS):
        """The integer hyper-synthesis of integer side latents, strip by strip with a halo: (first latent row,
        exact output accumulator (B, C, rows, size[1]) in float64) per strip of `strip` rows of z."""
        z = z_hat.detach().to("cpu", torch.float64).clamp(-ACT_MAX, ACT_MAX)
        for r0 in range(0, z.shape[2], strip):
            a, b = max(r0 - INDEX_HALO, 0), min(r0 + strip + INDEX_HALO, z.shape[2])
            acc = self._int_h_s(z[:, :, a:b])[:, :, 4 * (r0 - a) : 4 * (r0 - a + strip)]
            yield 4 * r0, acc[..., : max(0, size[0] - 4 * r0), : size[1]]

    def _int_h_s(self, a):
        """The integer hyper-synthesis on integer float64 side latents: exact output accumulator (float64)."""
        return int_net(convs_of(self.h_s), a, 0)[0]

    def hyper_input(self, u):
        """What h_a sees of the unscaled latents: their magnitudes (the scale hyperprior predicts no signs)."""
        return u.abs()

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


# ----------------------------------------------------------------------------- context model
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


class CtxModel(HyperModel):
    """The hyper model with a mean-scale hyperprior and a channel-wise context model (Minnen & Singh 2020,
    uneven slices as in He et al. 2022): h_s predicts a mean and a log-scale per latent, and each slice's
    context network refines them from the slices already decoded. Decoding runs slice after slice, every
    slice in parallel.

    Every number that decides a symbol's table or its value is integer: h_s and the context networks run
    as integer networks (int_net), the mean is fixed point with MEAN_BITS fractional bits, the coded symbol
    is round(y − μ) and the decoder's latent is exactly μ + symbol. The quality's gains enter as stored
    integers per table quality (gain_units, igain_units), like the scale-index offsets.
    """

    FIT_NOTE = ", hyperprior started as per-channel zero-mean Gaussians"
    INTEGER_NETWORKS = ("_hyper_fixed", "_int_context")

    def __init__(self, cfg):
        super().__init__(cfg)
        m, h = cfg.M, cfg.H
        if sum(cfg.slices) != m or min(cfg.slices) < 1:
            raise ValueError(f"slices {cfg.slices} do not split the {m} latent channels")
        self.h_a[0] = nn.Conv2d(2 * m, h, 3, padding=1)  # sees u and |u|: the means need the signs
        self.h_s[-1] = nn.Conv2d(h, 2 * m, 3, padding=1)  # means, then log-scales
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

    ENTROPY_MODULES = ("prior", "h_a", "h_s", "context", "spatial")
    ENTROPY_LR_SCALE = 10.0  # the entropy networks learn at 10× the transforms' rate (they start from zero)

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

    def _slices(self, h, y, g, ig, rounding=ste_round):
        """Float context chain (training, estimates, the encoder search): h_s' output h, the latents y and the gains →
        the means and log-scales of every latent (y units) and the decoded latents μ + rounding(y − μ)."""
        m, means, log_scales, decoded = self.cfg.M, [], [], []
        black = checkerboard(y.shape[-2:], y.device)
        for k, (a, b) in enumerate(self.bounds):
            mean, log_scale = h[:, a:b], h[:, m + a : m + b]
            if k:
                d = self.context[k - 1](torch.cat([mean, log_scale, torch.cat(decoded, 1) * ig[:, :a]], 1))
                mean, log_scale = mean + d[:, : b - a], log_scale + d[:, b - a :]
            if self.spatial:
                mean_y = mean * g[:, a:b]
                d = self.spatial[k]((rounding(y[:, a:b] - mean_y) + mean_y) * ig[:, a:b] * black) * ~black
                mean, log_scale = mean + d[:, : b - a], log_scale + d[:, b - a :]
            mean = mean * g[:, a:b]
            decoded.append(rounding(y[:, a:b] - mean) + mean)
            means.append(mean)
            log_scales.append(log_scale)
        return torch.cat(means, 1), torch.cat(log_scales, 1), torch.cat(decoded, 1)

    def entropy_forward(self, u, quality, noise=None):
        """Training pass of the entropy model: noisy latents around their means for the rate, μ + round(y − μ)
        (straight through) for the decoder."""
        g, ig = (t.to(u.device) for t in self.gains(quality))
        y = u * g
        z_tilde, z_lik = self.prior(self.h_a(self.hyper_input(u)), training=True)
        h = self.h_s(z_tilde)[..., : y.shape[-2], : y.shape[-1]]
        mean, log_scale, y_hat = self._slices(h, y, g, ig)
        y_tilde = y + (noise if noise is not None else torch.rand_like(y) - 0.5)
        y_lik = self.gaussian.likelihood(y_tilde - mean, torch.exp(log_scale) * g)
        return {"y_hat": y_hat, "likelihoods": [y_lik, z_lik], "pixels": self._pixels(u)}

    def rate_bits(self, latents, quality):
        """Bits of batched decoded latents and side latents under the float networks' means and scales;
        differentiable."""
        return self._coded_bits(latents, quality, lambda v: v)[0]

    def _coded_bits(self, latents, quality, rounding):
        """(bits, decoded latents μ + rounding(y − μ)) of batched latents y and side latents z (z rounded by
        `rounding` too) under the float networks: the coder's chain with relaxed rounding."""
        y, z = latents["y"], rounding(latents["z"])
        g, ig = (t.to(y.device) for t in self.gains(quality))
        mean, log_scale, y_hat = self._slices(self.h_s(z)[..., : y.shape[-2], : y.shape[-1]], y, g, ig, rounding)
        bits = -torch.log2(self.gaussian.likelihood(y_hat - mean, torch.exp(log_scale) * g)).sum()
        return bits - torch.log2(self.prior.likelihood(z)).sum(), y_hat

    def rd_cost(self, latents, x, quality, size, rounding=None):
        """bits per pixel + λ·255²·MSE of batched latents: every latent quantized around its mean as the coder
        does, μ + rounding(y − μ) slice after slice (None: the latents are the decoded ones already)."""
        bits, y_hat = self._coded_bits(latents, quality, rounding or (lambda v: v))
        return self._rd(bits, y_hat, x, quality, size)

    @torch.no_grad()
    def settled(self, latents, quality):
        """A search's continuous latents (unbatched, on the CPU) → the coder's: z rounded, then the integer chain
        rounds y − μ around the exact integer means."""
        return self._encoded(latents["y"].double(), torch.round(latents["z"]), quality)

    # z sets the means, so moving it moves where every latent rounds to: the hyper model's side search (rate
    # alone, picture fixed) does not apply; the full search moves z with y. Measured for a re-rounding side
    # search on 2 Kodak images: 0.16 s a step, and files 1.8 % smaller at quality 6 but 3.7 % larger at
    # quality 2. Not used.
    SIDE_KEYS = ()

    # -- the integer chain (coding)
    @property
    def index_frac(self):
        """Fractional bits of the integer log-scales the table index is taken from."""
        return LOG_BITS

    def build_tables(self):
        """The hyper model's tables (units of LOG_BITS) and the integer gains of every table quality."""
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

    @staticmethod
    def _int_context(net, x):
        """A context network as an integer network on its float64 integer input (C, h, w) at ACT_BITS, in strips
        of rows: (exact accumulator (C_out, h, w), its fractional bits)."""
        convs, rows, parts = convs_of(net), x.shape[1], []
        for r0 in range(0, rows, CONTEXT_ROWS):
            a, b = max(r0 - 1, 0), min(r0 + CONTEXT_ROWS + 1, rows)
            acc, frac = int_net(convs, x[None, :, a:b], ACT_BITS)
            parts.append(acc[0, :, r0 - a : r0 - a + min(CONTEXT_ROWS, rows - r0)])
        return torch.cat(parts, 1), frac

    def _chain(self, z_hat, quality, size, pick):
        """The integer context chain: slice after slice (and within a slice, with a checkerboard, black squares then
        white), the exact mean (MEAN_BITS fixed point, y units) and scale index of every latent; pick(a, b, mean,
        index, where) gives the slice's integer symbols at the (h, w) mask `where` (None: all) — the encoder rounds,
        the decoder reads. Returns the decoded latents μ + symbol in MEAN_BITS fixed point (int64)."""
        stored_frac, step = self.index_units.tolist()
        if stored_frac != LOG_BITS or step <= 0 or self.gain_units.numel() == 0:
            raise ValueError("no integer tables (or built for other weights): rebuild the tables")
        level, m = self.table_level(quality), self.cfg.M
        gain, igain, offsets = (t[level].view(-1, 1, 1).cpu() for t in (self.gain_units, self.igain_units, self.index_offsets))
        feats, log_scales = self._hyper_fixed(z_hat, size)
        y = torch.zeros((m, *size), dtype=torch.int64)
        inputs = torch.zeros((m, *size), dtype=torch.float64)  # ŷ · inverse gain at ACT_BITS: what the context sees
        black = checkerboard(size)
        for k, (a, b) in enumerate(self.bounds):
            mean, log_scale = feats[a:b].double(), log_scales[a:b]
            if k:
                x = torch.cat([feats[a:b].double(), feats[m + a : m + b].double(), inputs[:a]])
                mean, log_scale = self._refined(self.context[k - 1], x, mean, log_scale)
            decoded = torch.zeros((b - a, *size), dtype=torch.int64)
            for half, where in enumerate((black, ~black) if self.spatial else (None,)):
                if half:  # white squares: refined from the black ones
                    x = torch.where(black, unscaled(decoded, igain[a:b]), 0.0)
                    mean, log_scale = self._refined(self.spatial[k], x, mean, log_scale)
                mean_y = torch.div(mean.clamp(-ACT_MAX, ACT_MAX).to(torch.int64) * gain[a:b],
                                   1 << (ACT_BITS + GAIN_BITS - MEAN_BITS), rounding_mode="floor")
                index = torch.div(log_scale + offsets[a:b] + step // 2, step, rounding_mode="floor")
                symbols = pick(a, b, mean_y, index.clamp_(0, GaussianConditional.LEVELS - 1).to(torch.uint8), where)
                value = (mean_y + symbols.to(torch.int64) * (1 << MEAN_BITS)).clamp_(-VALUE_MAX, VALUE_MAX)
                decoded = value if where is None else torch.where(where, value, decoded)
            y[a:b] = decoded
            inputs[a:b] = unscaled(decoded, igain[a:b])
        return y

    def _refined(self, net, x, mean, log_scale):
        """Unscaled means (ACT_BITS, float64) and log-scales (LOG_BITS, int64) plus a context network's integer
        output on x."""
        acc, frac = self._int_context(net, x)
        c = mean.shape[0]
        return mean + fixed_point(acc[:c], frac, ACT_BITS), log_scale + fixed_point(acc[c:], frac, LOG_BITS).to(torch.int64)

    @torch.no_grad()  # not inference_mode: callers may edit the returned tensors
    def latents(self, u, quality):
        """The whole image's unscaled latents (M, h, w) → {"y": decoded latents μ + round(y − μ) (float64, exact),
        "z": integer side latents}."""
        y = (u[None] * self.gains(quality)[0].to(u.device))[0].cpu().double()
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

        latents = {"y": self._chain(z[None], quality, y.shape[1:], rounding).double() / 2.0**MEAN_BITS, "z": z}
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

        self._chain(latents["z"][None], quality, y.shape[1:], given)
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

        return {"y": self._chain(z[None], quality, shape[1:], read).double() / 2.0**MEAN_BITS, "z": z}

    def likelihoods(self, y_hat, quality, z_hat):
        """Likelihoods of decoded latents (1, M, h, w) under the integer means and table scales, and of z_hat."""
        scales = GaussianConditional.table_scales().to(torch.float32)
        parts = self._symbols({"y": y_hat[0].cpu(), "z": z_hat[0].cpu()}, quality)
        lik = torch.cat([self.gaussian.likelihood(s.float(), scales[index.long()]).reshape(-1) for s, index in parts])
        return [lik.view(1, -1, 1, 1).to(y_hat.device), self.prior.likelihood(z_hat)]

    def evaluate(self, x, quality):
        """Real-coding pass (validation): the coder's integer means and scale indices, per sample."""
        ig = self.gains(quality)[1]
        u = self.g_a(x)
        self.build_tables()  # the weights move during training: tables of the current ones
        decoded = [self.latents(u[i], float(q)) for i, q in enumerate(quality.tolist())]
        y_hat = torch.stack([d["y"] for d in decoded]).to(x.device, torch.float32)
        per_sample = [self.likelihoods(y_hat[i : i + 1], float(q), d["z"][None].to(x.device))
                      for i, (q, d) in enumerate(zip(quality.tolist(), decoded))]
        lik = [torch.cat(parts) for parts in zip(*per_sample)]
        return {"x_hat": self.g_s(y_hat * ig.to(x.device)), "likelihoods": lik}

    @torch.no_grad()
    def adopt(self, source):
        """Copy what fits of another model; from a scale hyperprior (hyper), h_a's |u| half and h_s' log-scale
        half too, the means starting at zero, so the new model starts coding exactly as the old one."""
        skipped = super().adopt(source)
        m = self.cfg.M
        first, last = source.h_a[0].weight, source.h_s[-1].weight
        if first.shape[1] == m and last.shape[0] == m:
            self.h_a[0].weight.zero_()
            self.h_a[0].weight[:, m:] = first
            self.h_a[0].bias.copy_(source.h_a[0].bias)
            self.h_s[-1].weight.zero_()
            self.h_s[-1].weight[m:] = last
            self.h_s[-1].bias.zero_()
            self.h_s[-1].bias[m:] = source.h_s[-1].bias
            skipped = [k for k in skipped if k not in ("h_a.0.weight", "h_s.4.weight", "h_s.4.bias")]
        self.build_tables()
        return skipped


# ----------------------------------------------------------------------------- registry
KINDS = {"seed": (SeedConfig, SeedAutoEncoder), "rd": (RDConfig, RDModel), "hyper": (HyperConfig, HyperModel),
         "ctx": (CtxConfig, CtxModel)}


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
