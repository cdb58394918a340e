"""Layers the transforms share: simplified GDN, stride-2 (transposed) convolutions, the sub-pixel rewrite of
the last synthesis layer, the colour + Haar wavelet start of a fresh transform pair, and widening a transform
without changing what it computes."""
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
    for i, a in narrow.named_children():  # by name: a wide model may hold layers the narrow one lacks
        b = getattr(wide, i)
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


@torch.no_grad()
def wavelet_start(g_a, g_s, x):
    """Start a GDN transform pair as an orthonormal colour + Haar wavelet codec fitted to sample crops x.

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
    downs = [m for m in g_a if isinstance(m, nn.Conv2d)]
    ups = [m for m in g_s if isinstance(m, nn.ConvTranspose2d)][::-1]
    basis = torch.einsum("ij,bkl->bijkl", colour, haar).reshape(12, 3, 2, 2)  # level 1: (band × colour, RGB, 2, 2)
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
    for m in [*g_a, *g_s]:
        if isinstance(m, GDN):
            m.beta.fill_(1.0)
            m.gamma.copy_(1e-3 * torch.eye(m.gamma.shape[0], device=x.device).view_as(m.gamma))
