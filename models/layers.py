"""Layers the transforms share: simplified GDN, stride-2 (transposed) convolutions, the sub-pixel rewrite of
the last synthesis layer, and widening a transform without changing what it computes."""
import torch
import torch.nn as nn
import torch.nn.functional as F


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
