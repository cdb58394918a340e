"""Integer networks and the coding of latents grouped by integer scale index: the machinery that makes every
symbol's probability bit-identical on every machine (the hyperprior and context models use it)."""
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from quantize import GaussianConditional, escape_segments, read_escapes, read_sparse, sparse_segments


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
