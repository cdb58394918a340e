"""Where a reader starts: the seed's ResNet auto-encoder (the student design the project began with) and the
registry that builds any model from its config. The learned families live one per module in models/
(factorized.py: rd, hyperprior.py: hyper, context.py: ctx) on models/transform.py's TransformCodec (GDN
transforms, a gain vector per quality) and models/base.py's CodingModel (the coding interface); checkpoint
files are checkpoint.py's.
"""
import struct
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from quantize import PRECISION, DecodeError, pmf_to_freqs, quantize_bbit
from models.base import CodingModel, distortion
from models.context import CtxConfig, CtxModel
from models.factorized import RDConfig, RDModel
from models.hyperprior import HyperConfig, HyperModel
from models.residual import ResCtxConfig, ResCtxModel


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
        """A coding tile's symbols (C, h, w) → latents dict."""
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
        own_lo, own = self._table(s + lo)  # the encoder writes the table of the symbols it codes, nothing else
        if own_lo != lo or not np.array_equal(own, freqs):
            raise DecodeError("payload corrupted (the frequency table is not its symbols')")
        return {"y": torch.from_numpy((s + lo).reshape(shape))}

    def estimated_bits(self, latents, quality=None):
        """Bits of the symbols under their own per-image table (the table itself not counted)."""
        lo, freqs = self._table(latents["y"].numpy())
        counts = np.bincount(latents["y"].numpy().ravel() - lo, minlength=len(freqs))
        return float(-(counts * np.log2(freqs / 2.0 ** PRECISION)).sum())

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


# ----------------------------------------------------------------------------- registry
KINDS = {"seed": (SeedConfig, SeedAutoEncoder), "rd": (RDConfig, RDModel), "hyper": (HyperConfig, HyperModel),
         "ctx": (CtxConfig, CtxModel), "resctx": (ResCtxConfig, ResCtxModel)}


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
