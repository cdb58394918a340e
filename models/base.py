"""What every model shares: the quality ladder's λs, the distortion, and CodingModel, the base class whose
methods are the coding and training interface that codec.py, effort.py and train.py use (each model file
implements it; docs/architecture.md lists it)."""
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


class CodingModel(nn.Module):
    """Base of every model. The coding interface, all that codec.py and effort.py use (each model implements it;
    this class gives the geometry and the training defaults):

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
    --entropy-only).
    """

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
