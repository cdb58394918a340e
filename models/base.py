"""What every model shares: the quality ladder's λs, the distortion, and CodingModel, the base class whose
methods are the coding and training interface that codec.py, effort.py and train.py use (each model file
implements it; docs/architecture.md lists it)."""
import abc

import torch
import torch.nn as nn
import torch.nn.functional as F

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


class CodingModel(nn.Module, metaclass=abc.ABCMeta):
    """Base of every model: the coding interface that codec.py and effort.py use and the training interface that
    train.py uses, nothing else (docs/architecture.md tables both; a test checks the table against this class).
    Abstract methods are what each model must provide; the others have a default that fits most models."""

    # How train.py stores the shippable checkpoint (checkpoint.pack_state). fp16 halves the file at no measured
    # cost (resctx.pt stored in fp16, tables rebuilt: BD-rate +0.0 % on Kodak); int8 cost +6.9 %.
    SHIP_PRECISION = "fp16"

    ENTROPY_MODULES = ()  # the entropy model's submodules: what train.py --entropy-only trains

    INTEGER_NETWORKS = ()  # methods running the integer networks the coding calls (tools/coding_report.py clocks them)

    SIDE_KEYS = ()  # latents that change only the rate (effort.py searches them without the synthesis)

    # -- coding interface
    @property
    def stride(self):
        """Pixels per latent along each side."""
        return self.cfg.stride

    def latent_shape(self, height, width):
        """Shape (C, h, w) of the latents of an image (padded up to a multiple of the stride)."""
        return (self.cfg.latent_channels, -(-height // self.stride), -(-width // self.stride))

    @abc.abstractmethod
    def rate_param(self, quality=None):
        """The user's rate setting checked and normalised into the header's integer; ValueError when impossible."""

    @abc.abstractmethod
    def quality_of(self, param):
        """Inverse of rate_param, for a file's header; ValueError when impossible."""

    @abc.abstractmethod
    def analyse(self, x):
        """One image tile (1, 3, H, W) in [0, 1] → analysis output (codec.py tiles large images with a halo)."""

    @abc.abstractmethod
    def latents(self, u, quality):
        """One coding tile's analysis output (codec.py codes each tile apart) → the integer latents dict ("y", and
        whatever else the model codes)."""

    @abc.abstractmethod
    def synthesize(self, y, quality):
        """One tile of integer latents (1, C, h, w) → image (unclamped)."""

    @abc.abstractmethod
    def write_latents(self, latents, quality, encode):
        """Latents → payload bytes; encode(segments) is the entropy coder the codec hands over."""

    @abc.abstractmethod
    def read_latents(self, payload, shape, quality, open_decoder):
        """Inverse of write_latents; open_decoder(bytes) returns an object with take(freqs, n)."""

    @abc.abstractmethod
    def estimated_bits(self, latents, quality):
        """The rate the model's own entropy model assigns to latents (rate honesty)."""

    @abc.abstractmethod
    def ladder(self, qualities):
        """The rates a benchmark measures the model at."""

    @abc.abstractmethod
    def has_tables(self):
        """Whether the integer entropy tables the coder needs are built."""

    @abc.abstractmethod
    def build_tables(self):
        """Build the integer entropy tables from the current weights (stored in the checkpoint)."""

    # -- what effort.py's encoder search needs; a model without a rate–distortion cost refuses a search
    def relaxed_latents(self, u, quality):
        """The latents before rounding, where a search starts."""
        return self.latents(u, quality)

    def rate_bits(self, latents, quality):
        """Differentiable bits of batched latents."""
        raise ValueError(f"the {self.cfg.kind} model has no rate to search: it codes at effort 0 only")

    def rd_cost(self, latents, x, quality, size, rounding=None):
        """Bits per pixel + λ·255²·MSE of batched latents, with the search's relaxed rounding where the model rounds."""
        raise ValueError(f"the {self.cfg.kind} model has no rate–distortion cost to search: it codes at effort 0 only")

    def settled(self, latents, quality):
        """A search's continuous latents → codable ones."""
        raise ValueError(f"the {self.cfg.kind} model has no encoder search")

    # -- training interface
    @abc.abstractmethod
    def forward(self, x, quality, noise=None):
        """Training pass → {"x_hat", and "likelihoods" for models with a rate term}."""

    @abc.abstractmethod
    def evaluate(self, x, quality):
        """Validation pass with the coder's rounding."""

    @abc.abstractmethod
    def loss(self, x, out, quality):
        """The training objective of a batch and its logged parts."""

    @abc.abstractmethod
    def draw_randomness(self, seeds, crop):
        """Per-sample (quality, noise) of a batch, keyed to each sample's seed (resumed and distributed runs agree)."""

    @abc.abstractmethod
    def validation_qualities(self):
        """The qualities validation averages over."""

    def initialise(self, crops):
        """Start of a fresh run from training crops; what was done (None: nothing)."""
        return None

    def refit(self, crops):
        """Fit the entropy model alone to training crops (a model started from another kind); what was done."""
        return None

    @torch.no_grad()
    def adopt(self, source):
        """Start from another model's weights: copy every same-named, same-shaped tensor; the names skipped."""
        return copy_matching(source, self)

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
