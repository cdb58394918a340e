"""Entropy coding and the compressed file format: image ↔ bytes for both kinds of model.

File layout (big-endian), version 4:

  offset size field
  0      3    magic b"QAE"
  3      1    format version (4)
  4      1    model kind: 0 = seed (B-bit, per-image table), 1 = rd (factorized prior), 2 = hyper
  5      1    entropy coder: 0 = constriction (ANS; range coder in versions 2–3), 1 = arithmetic-compressor
  6      4    model identity (first 4 bytes of SHA-256 over the checkpoint's tensors)
  10     2,2  original height, width
  14     1    original mode: 0 RGB, 1 L, 2 RGBA, 3 LA
  15     2    rate parameter: seed = B, rd = quality × 100 (tables of the nearest stored quality)
  17     2×3  latent shape C, h, w
  23     4    payload length (entropy-coded latents)
  27     4    alpha length (zlib-compressed alpha plane, 0 if none)
  31     …    payload, then alpha
  end-4  4    CRC-32 of everything before it

The rd payload holds, in one coder stream, each latent channel's symbols under that quality's
integer table (whose last symbol is an escape), then the escaped values themselves (Exp-Golomb,
fixed tables), so no latent is ever clamped. The hyper payload holds the side latents z the same way
(one quality-independent table per channel), then the latents grouped by their integer scale index
(computed from z by the integer hyper-synthesis), each group under its Gaussian table, then escapes.
Version 4 codes with constriction's ANS coder (faster than its range coder both ways, same size);
versions 2 and 3 (range coder; hyper payloads only from 3) are still read. Version 1 (one table for
all qualities, clamped tails) is no longer read.

Reading never trusts the file: every size is checked against the data and against limits before
anything is allocated, and any inconsistency raises FormatError with a one-line reason.
"""
import functools
import struct
import zlib

import constriction
import numpy as np
import torch
import torch.nn.functional as F
from arithmetic_compressor import arithmetic_coding as ac
from arithmetic_compressor.util import Range

from model import HyperModel, RDModel
from quantize import PRECISION, pmf_to_freqs, quantize_bbit

MAGIC = b"QAE"
VERSION = 4  # 3: hyper payloads code their smallest-scale latents sparsely; 4: ANS instead of the range coder
READS = (2, 3, 4)
HEADER = struct.Struct(">3sBBB4sHHBHHHHII")
KINDS = ("seed", "rd", "hyper")
CODERS = ("constriction", "arithmetic-compressor")
RANGE_CODER = "constriction-range"  # what "constriction" meant before version 4: read, no longer written
MODES = ("RGB", "L", "RGBA", "LA")
MAX_PIXELS = 1 << 28  # 268 M pixels: larger declared sizes are rejected before allocating
HEADER_BYTES = HEADER.size + 4


class FormatError(ValueError):
    """A compressed file is truncated, corrupted, foreign, or made by another model."""


# ----------------------------------------------------------------------------- file format
def pack(header, payload, alpha=b""):
    """Serialise header dict + payload (+ alpha) into the file bytes, CRC-32 last."""
    body = HEADER.pack(MAGIC, VERSION, KINDS.index(header["kind"]), CODERS.index(header["coder"]),
                       header["model_id"], header["height"], header["width"], MODES.index(header["mode"]),
                       header["param"], *header["latent_shape"], len(payload), len(alpha)) + payload + alpha
    return body + struct.pack(">I", zlib.crc32(body))


def unpack(data):
    """Parse and check file bytes; returns (header dict, payload, alpha) or raises FormatError."""
    if len(data) < len(MAGIC) or data[: len(MAGIC)] != MAGIC:
        raise FormatError("not a QAE compressed file (wrong magic bytes)")
    if len(data) < HEADER_BYTES:
        raise FormatError(f"file truncated: {len(data)} bytes is shorter than the {HEADER_BYTES}-byte header")
    fields = HEADER.unpack_from(data)
    _, version, kind, coder, mid, h, w, mode, param, c, lh, lw, n_payload, n_alpha = fields
    if version not in READS or (version < 3 and kind == KINDS.index("hyper")):
        raise FormatError(f"format version {version} is not supported for this kind of file "
                          f"(this build writes version {VERSION})")
    if HEADER.size + n_payload + n_alpha + 4 != len(data):
        raise FormatError(f"file truncated or padded: header declares {HEADER.size + n_payload + n_alpha + 4} "
                          f"bytes, file has {len(data)}")
    if zlib.crc32(data[:-4]) != struct.unpack(">I", data[-4:])[0]:
        raise FormatError("file corrupted (CRC-32 mismatch)")
    if kind >= len(KINDS) or coder >= len(CODERS) or mode >= len(MODES):
        raise FormatError("file corrupted (unknown model kind, coder or mode)")
    if h == 0 or w == 0 or h * w > MAX_PIXELS or c == 0 or lh == 0 or lw == 0:
        raise FormatError(f"file declares an impossible size ({w}×{h}, latent {c}×{lh}×{lw})")
    coder = CODERS[coder]
    if coder == "constriction" and version < 4:
        coder = RANGE_CODER  # the same coder byte named constriction's range coder before version 4
    header = {"kind": KINDS[kind], "coder": coder, "model_id": mid, "height": h, "width": w,
              "mode": MODES[mode], "param": param, "latent_shape": (c, lh, lw)}
    payload = data[HEADER.size : HEADER.size + n_payload]
    return header, payload, data[HEADER.size + n_payload : HEADER.size + n_payload + n_alpha]


# ----------------------------------------------------------------------------- entropy coders
def _constriction_model(freqs):
    """constriction model of integer frequencies: exact dyadic floats, so every machine builds the same one."""
    freqs = np.asarray(freqs)
    return _cached_model(freqs.dtype.str, freqs.tobytes())


@functools.lru_cache(maxsize=4096)
def _cached_model(dtype, key):
    """The model of a table's bytes: every file reuses the same few hundred tables, and building one
    costs more than coding a thousand symbols."""
    return constriction.stream.model.Categorical(np.frombuffer(key, dtype) / (1 << PRECISION), perfect=False)


def _ac_table(freqs):
    """arithmetic-compressor cumulative table {symbol: Range} of integer frequencies."""
    cum = np.concatenate([[0], np.cumsum(freqs)])
    return {s: Range(int(cum[s]), int(cum[s + 1])) for s in range(len(freqs))}


def entropy_encode(segments, coder):
    """Code a list of (symbols, integer frequencies) segments into one byte string."""
    if coder in ("constriction", RANGE_CODER):
        # ANS is a stack: the segments go in last to first so that they come out first to last.
        ans = coder == "constriction"
        enc = constriction.stream.stack.AnsCoder() if ans else constriction.stream.queue.RangeEncoder()
        for symbols, freqs in reversed(segments) if ans else segments:
            if len(freqs) > 1 and len(symbols):
                symbols = np.ascontiguousarray(symbols, dtype=np.int32)
                (enc.encode_reverse if ans else enc.encode)(symbols, _constriction_model(freqs))
        return enc.get_compressed().astype(">u4").tobytes()
    if coder == "arithmetic-compressor":
        enc = ac.Encoder(numbits=32)  # 32-bit state: totals up to 2**30 are allowed
        for symbols, freqs in segments:
            if len(freqs) > 1:
                table = _ac_table(freqs)
                for s in np.asarray(symbols).ravel().tolist():
                    enc.encode_symbol(table, s)
        enc.finish()
        return np.packbits(np.array(enc.get_encoded(), dtype=np.uint8)).tobytes()
    raise ValueError(f"unknown entropy coder {coder!r} (choose from {', '.join(CODERS)})")


class SymbolDecoder:
    """Reads, segment after segment, the symbols that entropy_encode wrote into one byte string."""

    def __init__(self, data, coder):
        self.coder = coder
        if coder in ("constriction", RANGE_CODER):
            if len(data) % 4:
                raise FormatError("payload corrupted (length is not a whole number of 32-bit words)")
            words = np.frombuffer(data, ">u4").astype(np.uint32)
            ans = coder == "constriction"
            self.dec = constriction.stream.stack.AnsCoder(words) if ans else constriction.stream.queue.RangeDecoder(words)
        elif coder == "arithmetic-compressor":
            self.dec = ac.Decoder(np.unpackbits(np.frombuffer(data, np.uint8)).tolist(), numbits=32)
        else:
            raise ValueError(f"unknown entropy coder {coder!r} (choose from {', '.join(CODERS)})")

    def take(self, freqs, n):
        """The next n symbols, coded with the integer frequencies freqs, as int32."""
        if len(freqs) < 2 or n == 0:
            return np.zeros(n, np.int32)  # a one-symbol alphabet costs nothing and is not coded
        if self.coder != "arithmetic-compressor":
            return self.dec.decode(_constriction_model(freqs), n).astype(np.int32, copy=False)
        table = _ac_table(freqs)
        return np.array([self.dec.decode_symbol(table) for _ in range(n)], np.int32)


def entropy_decode(data, tables, counts, coder):
    """Inverse of entropy_encode: decode counts[i] symbols with tables[i]; list of int32 arrays."""
    dec = SymbolDecoder(data, coder)
    return [dec.take(freqs, n) for freqs, n in zip(tables, counts)]


# Escaped latents are rare (< 1e-6 of the mass per side), so a plain Exp-Golomb code is enough:
# the prefix length under a uniform table of 32, then the bits below the leading one.
EG_LENGTHS = np.full(32, 1 << (PRECISION - 5), np.int64)
EG_BITS = np.full(2, 1 << (PRECISION - 1), np.int64)
# Prefix lengths favouring short codes (P(n) ~ 2^-(n+1)), for the small numbers of sparse coding.
EG_SHORT = np.maximum((1 << (PRECISION - 1)) >> np.arange(32), 1)
EG_SHORT[0] += (1 << PRECISION) - EG_SHORT.sum()


def _bit_shifts(n):
    """For Exp-Golomb codes of n[i] payload bits each, written back to back: each bit's shift, MSB first."""
    starts = np.cumsum(n) - n
    return np.repeat(starts + n - 1, n) - np.arange(int(n.sum()))


def escape_segments(values, lengths=EG_LENGTHS):
    """Exp-Golomb segments (lengths, bits) of escaped integer latent values (zigzag-mapped, signed);
    `lengths` is the table of the prefix (code length) symbols."""
    v = np.asarray(values, np.int64)
    z = np.where(v >= 0, 2 * v, -2 * v - 1) + 1
    n = (np.frexp(z.astype(np.float64))[1] - 1).astype(np.int64)  # exact: |z| < 2**53
    if len(n) and n.max() >= len(lengths):
        raise ValueError("a latent value is too large to code (|value| ≥ 2**30)")
    bits = (np.repeat(z, n) >> _bit_shifts(n)) & 1
    return [(n, lengths), (bits, EG_BITS)]


def read_escapes(dec, count, lengths=EG_LENGTHS):
    """Inverse of escape_segments: the next `count` escaped values from a SymbolDecoder."""
    if count == 0:  # the usual case, and a few array operations saved per group
        return np.zeros(0, np.int64)
    n = dec.take(lengths, count).astype(np.int64)
    bits = dec.take(EG_BITS, int(n.sum())).astype(np.int64)
    owner = np.repeat(np.arange(count), n)
    z = (np.int64(1) << n) + np.bincount(owner, weights=bits << _bit_shifts(n), minlength=count).astype(np.int64)
    return np.where(z % 2 == 1, (z - 1) // 2, -(z // 2))


# ----------------------------------------------------------------------------- seed model payload
def _seed_table(symbols, bits):
    """Per-image static frequency table over the symbol range actually used: (lo, freqs)."""
    counts = np.bincount(symbols.ravel(), minlength=2 ** bits + 1)
    used = np.nonzero(counts)[0]
    lo, hi = int(used[0]), int(used[-1])
    return lo, pmf_to_freqs(counts[lo : hi + 1])


def seed_payload(symbols, bits, coder):
    """Seed model payload: table (lo, n, freqs − 1 as u16) then the coded symbols."""
    lo, freqs = _seed_table(symbols, bits)
    table = struct.pack(">HH", lo, len(freqs)) + (freqs - 1).astype(">u2").tobytes()
    return table + entropy_encode([(symbols.ravel() - lo, freqs)], coder)


def seed_symbols(payload, shape, bits, coder):
    """Inverse of seed_payload: the symbols (C, h, w) as int32."""
    if len(payload) < 4:
        raise FormatError("payload truncated (no frequency table)")
    lo, n = struct.unpack_from(">HH", payload)
    if n == 0 or lo + n > 2 ** bits + 1 or len(payload) < 4 + 2 * n:
        raise FormatError("payload corrupted (bad frequency table)")
    freqs = np.frombuffer(payload, ">u2", n, 4).astype(np.int64) + 1
    if freqs.sum() != 1 << PRECISION:
        raise FormatError("payload corrupted (frequency table does not sum to 2^16)")
    (s,) = entropy_decode(payload[4 + 2 * n :], [freqs], [int(np.prod(shape))], coder)
    return (s + lo).reshape(shape)


# ----------------------------------------------------------------------------- image ↔ bytes
TILE = 1024  # pixels: larger images are coded in overlapping tiles, which bounds memory
HALO = 64  # pixels of context on each side of a tile (≥ the rd analysis transform's 61-px receptive field)


def _spans(n, tile, halo):
    """(start, end, start with halo, end with halo) of the tiles covering 0 … n."""
    return [(a, min(a + tile, n), max(0, a - halo), min(n, a + tile + halo)) for a in range(0, n, tile)]


def analysis_of(model, rgb):
    """Encoder output of an image: seed = symbols 0 … 2**B, rd = unscaled float latents u; (C, h, w).

    The image is replicate-padded to a multiple of the stride and, when large, encoded in tiles with
    HALO pixels of context, so peak memory stays bounded for any image size.
    """
    s, device = model.cfg.stride, next(model.parameters()).device
    h, w = rgb.shape[:2]
    ph, pw = -(-h // s) * s, -(-w // s) * s
    out = None
    for y0, y1, ya, yb in _spans(ph, TILE, HALO):
        for x0, x1, xa, xb in _spans(pw, TILE, HALO):
            x = torch.from_numpy(np.array(rgb[ya:yb, xa:xb]))  # a copy: Pillow arrays are read-only
            x = x.permute(2, 0, 1)[None].float() / 255.0
            x = F.pad(x, (0, xb - xa - x.shape[-1], 0, yb - ya - x.shape[-2]), mode="replicate")
            x = x.to(device).contiguous(memory_format=torch.channels_last)
            with torch.inference_mode():
                if isinstance(model, RDModel):
                    y = model.g_a(x)[0].cpu()
                else:
                    y = quantize_bbit(model.encoder(x), model.cfg.bits, "symbols")[0].cpu()
            if out is None:
                out = torch.empty((y.shape[0], ph // s, pw // s), dtype=y.dtype)
            out[:, y0 // s : y1 // s, x0 // s : x1 // s] = y[:, (y0 - ya) // s : (y1 - ya) // s, (x0 - xa) // s : (x1 - xa) // s]
    return out


def latents_of(model, rgb, quality=None):
    """Integer latents of an image as a dict: "y" (C, h, w) and, for the hyper model, side latents "z".

    The hyper model's h_a runs on the whole latent image (1/16 of the pixels), not in tiles.
    """
    u = analysis_of(model, rgb)
    if not isinstance(model, RDModel):
        return {"y": u}
    with torch.no_grad():  # not inference_mode: callers may edit the returned tensors
        u = u[None].to(next(model.parameters()).device)
        latents = {"y": model.quantize_latents(u, quality)[0].cpu()}
        if isinstance(model, HyperModel):
            latents["z"] = model.side_latents(u)[0].cpu()
    return latents


def image_of(model, latents, height, width, quality=None):
    """Reconstruct uint8 RGB (H, W, 3) from a latents dict, rounding and clamping; tiled when large."""
    s, device, y = model.cfg.stride, next(model.parameters()).device, latents["y"]
    out = np.empty((height, width, 3), np.uint8)
    for y0, y1, ya, yb in _spans(y.shape[1], TILE // s, HALO // s):
        for x0, x1, xa, xb in _spans(y.shape[2], TILE // s, HALO // s):
            z = y[None, :, ya:yb, xa:xb].float().to(device).contiguous(memory_format=torch.channels_last)
            with torch.inference_mode():
                if isinstance(model, RDModel):
                    x = model.decode_latents(z, quality)
                else:
                    x = model.decoder(quantize_bbit(z, model.cfg.bits, "dequantize"))
            x = x[0, :, (y0 - ya) * s : (y1 - ya) * s, (x0 - xa) * s : (x1 - xa) * s]
            x = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
            hh, ww = min(y1 * s, height) - y0 * s, min(x1 * s, width) - x0 * s
            out[y0 * s : y0 * s + hh, x0 * s : x0 * s + ww] = x[:hh, :ww]
    return out


def factorized_segments(prior, v, level):
    """Per-channel (symbols, frequencies) segments of integer values v (C, h, w) under a factorized
    prior's tables at a level, then the escaped values."""
    sym, escaped = prior.to_symbols(v.cpu().numpy(), level)
    return [(sym[c].ravel(), table) for c, table in enumerate(prior.tables(level))] + escape_segments(escaped)


def read_factorized(dec, prior, shape, level):
    """Inverse of factorized_segments, reading from a SymbolDecoder: values (C, h, w)."""
    symbols = np.stack([dec.take(t, shape[1] * shape[2]) for t in prior.tables(level)]).reshape(shape)
    return torch.from_numpy(prior.from_symbols(symbols, level, lambda count: read_escapes(dec, count)))


def _scale_groups(model, z_hat, quality, size):
    """Order that groups latents (M, *size) by their integer scale index, and the count per index."""
    index = model.scale_index(z_hat[None], quality, size)[0].reshape(-1)
    # A stable sort's order is unique, so torch's (parallel, radix) sort gives every machine the same groups.
    levels, order = torch.sort(index, stable=True)
    bounds = np.searchsorted(levels.numpy(), np.arange(len(model.gaussian.lengths) + 1, dtype=levels.numpy().dtype))
    return order.numpy(), np.diff(bounds)


# Latents whose scale index is below SPARSE_LEVELS (scale 0.11) are ~40 % of a Kodak image's at
# quality 4 and nearly all zero (measured: 1 in 100 … 3,000 is ±1): they are coded as the positions
# and values of their few nonzeros, not one coder symbol each, which saves that share of the
# decoding time and, measured, no bytes (files equal or smaller than one symbol each).
SPARSE_LEVELS = 1


def _gap_shift(n, count):
    """Low bits of each gap written raw (Rice-style): about log2 of the mean gap, from what both sides know."""
    return max(int(n // (count + 1)).bit_length() - 1, 0)


def sparse_segments(values):
    """Segments of mostly-zero integer values: the number of nonzeros, the gaps between them (high part
    Exp-Golomb, low bits raw), their values."""
    nz = np.flatnonzero(values)
    gaps, k = np.diff(nz, prepend=-1) - 1, _gap_shift(len(values), len(nz))
    low = (np.repeat(gaps, k) >> np.tile(np.arange(k - 1, -1, -1), len(gaps))) & 1
    return (escape_segments([len(nz)]) + escape_segments(gaps >> k, EG_SHORT) + [(low, EG_BITS)]
            + escape_segments(np.rint(values[nz]), EG_SHORT))


def read_sparse(dec, n):
    """Inverse of sparse_segments for n values, from a SymbolDecoder: (positions, values) of the nonzeros."""
    count = int(read_escapes(dec, 1)[0])
    if not 0 <= count <= n:
        raise FormatError("payload corrupted (sparse count out of range)")
    k = _gap_shift(n, count)
    high = read_escapes(dec, count, EG_SHORT)
    low = dec.take(EG_BITS, count * k).astype(np.int64).reshape(count, k) << np.arange(k - 1, -1, -1)
    positions = np.cumsum((high << k) + low.sum(axis=1) + 1) - 1
    if count and (positions.min() < 0 or positions[-1] >= n):
        raise FormatError("payload corrupted (sparse position out of range)")
    return positions, read_escapes(dec, count, EG_SHORT)


def _take_sparse(counts):
    """Number of the sparse-coded latents (the first SPARSE_LEVELS groups); their counts are zeroed in place,
    since they are not coded one symbol each under the Gaussian tables."""
    n = int(counts[:SPARSE_LEVELS].sum())
    counts[:SPARSE_LEVELS] = 0
    return n


def latent_segments(model, latents, quality):
    """All (symbols, frequencies) segments of an rd or hyper model's latents dict at a quality."""
    if not isinstance(model, HyperModel):
        return factorized_segments(model.prior, latents["y"], model.table_level(quality))
    y, z = latents["y"], latents["z"]
    order, counts = _scale_groups(model, z, quality, y.shape[1:])
    grouped, n_sparse = y.numpy().reshape(-1)[order], _take_sparse(counts)
    sym, escaped = model.gaussian.to_symbols(grouped[n_sparse:], counts)
    groups = np.split(sym, np.cumsum(counts)[:-1])
    return (factorized_segments(model.prior, z, 0) + sparse_segments(grouped[:n_sparse])
            + list(zip(groups, model.gaussian.tables())) + escape_segments(escaped))


def payload_latents(model, payload, shape, quality, coder):
    """Inverse of latent_segments + entropy_encode: the latents dict from an rd or hyper payload."""
    dec = SymbolDecoder(payload, coder)
    if not isinstance(model, HyperModel):
        return {"y": read_factorized(dec, model.prior, shape, model.table_level(quality))}
    z = read_factorized(dec, model.prior, model.side_shape(shape), 0)
    order, counts = _scale_groups(model, z, quality, shape[1:])
    n_sparse = _take_sparse(counts)
    y = np.zeros(len(order), np.float32)
    positions, values = read_sparse(dec, n_sparse)
    y[order[positions]] = values
    symbols = np.concatenate([dec.take(t, int(n)) for t, n in zip(model.gaussian.tables(), counts)])
    y[order[n_sparse:]] = model.gaussian.from_symbols(symbols, counts, lambda count: read_escapes(dec, count))
    return {"y": torch.from_numpy(y.reshape(shape)), "z": z}


def check_quality(model, quality):
    """Quality rounded to the 0.01 grid the file stores; clear error outside the trained range."""
    if quality is None:
        quality = model.num_qualities
    if not 1 <= quality <= model.num_qualities:
        raise ValueError(f"quality {quality} is outside this model's range 1 … {model.num_qualities}")
    return round(quality * 100) / 100


def compress(model, model_id, rgb, mode="RGB", alpha=None, quality=None, coder="constriction"):
    """Image (uint8 H×W×3, original mode, optional H×W alpha) → file bytes."""
    h, w = rgb.shape[:2]
    if not (1 <= h <= 0xFFFF and 1 <= w <= 0xFFFF):
        raise ValueError(f"image of {w}×{h} pixels: each side must be 1 … 65535")
    if isinstance(model, RDModel):
        quality = check_quality(model, quality)
        latents = latents_of(model, rgb, quality)
        payload, param = entropy_encode(latent_segments(model, latents, quality), coder), round(quality * 100)
    else:
        latents = latents_of(model, rgb)
        payload, param = seed_payload(latents["y"].numpy(), model.cfg.bits, coder), model.cfg.bits
    header = {"kind": model.cfg.kind, "coder": coder, "model_id": model_id, "height": h, "width": w,
              "mode": mode, "param": param, "latent_shape": tuple(latents["y"].shape)}
    packed_alpha = zlib.compress(np.ascontiguousarray(alpha, np.uint8).tobytes(), 9) if alpha is not None else b""
    return pack(header, payload, packed_alpha)


def read_latents(model, model_id, data):
    """File bytes → (header, latents dict, quality or None); FormatError for any bad file.

    Only integer tables decide the symbols, so the latents are bit-identical on every machine.
    """
    header, payload, _ = unpack(data)
    if header["model_id"] != model_id:
        raise FormatError(f"file was made by model {header['model_id'].hex()}, "
                          f"but the loaded weights are {model_id.hex()}")
    h, w, stride = header["height"], header["width"], model.cfg.stride
    shape = (model.cfg.M if isinstance(model, RDModel) else model.cfg.latent_channels,
             -(-h // stride), -(-w // stride))
    if header["kind"] != model.cfg.kind or tuple(header["latent_shape"]) != shape:
        raise FormatError(f"file corrupted (latent shape {header['latent_shape']} does not fit a {w}×{h} image)")
    try:
        if isinstance(model, RDModel):
            quality = header["param"] / 100
            if not 1 <= quality <= model.num_qualities:
                raise FormatError(f"file corrupted (quality {quality} outside 1 … {model.num_qualities})")
            return header, payload_latents(model, payload, shape, quality, header["coder"]), quality
        if header["param"] != model.cfg.bits:
            raise FormatError(f"file corrupted (B = {header['param']}, model has B = {model.cfg.bits})")
        return header, {"y": torch.from_numpy(seed_symbols(payload, shape, model.cfg.bits, header["coder"]))}, None
    except FormatError:
        raise
    except Exception as e:  # the entropy decoders' own errors on garbage input
        raise FormatError(f"payload corrupted ({type(e).__name__})") from None


def decompress(model, model_id, data):
    """File bytes → (uint8 H×W×3, mode, alpha or None); FormatError for any bad file."""
    header, latents, quality = read_latents(model, model_id, data)
    h, w = header["height"], header["width"]
    rgb = image_of(model, latents, h, w, quality)
    alpha = None
    if header["mode"] in ("RGBA", "LA"):
        packed_alpha = unpack(data)[2]
        d = zlib.decompressobj()
        try:
            raw = d.decompress(packed_alpha, h * w + 1)  # bounded: never inflates past the image size
        except zlib.error:
            raise FormatError("alpha plane corrupted") from None
        if len(raw) != h * w:
            raise FormatError("alpha plane corrupted (wrong size)")
        alpha = np.frombuffer(raw, np.uint8).reshape(h, w)
    return rgb, header["mode"], alpha


def compress_file(model, model_id, src, dst, quality=None, coder="constriction", seal=None):
    """Image file src → compressed file dst, written atomically: (file bytes, read_image's notices).
    `seal` (optional) transforms the bytes before they are written: test.py's encryption."""
    rgb, mode, alpha, notices = read_image(src)
    data = compress(model, model_id, rgb, mode, alpha, quality, coder)
    if seal is not None:
        data = seal(data)
    atomic_write(dst, data)
    return data, notices


def decompress_file(model, model_id, data, dst):
    """Compressed file bytes → image file dst (format from its extension), written atomically; the RGB array."""
    rgb, mode, alpha = decompress(model, model_id, data)
    write_image(dst, rgb, mode, alpha)
    return rgb


def estimated_bits(model, latents, quality):
    """Bits the rd or hyper model's (float) entropy model assigns to a latents dict: the rate it trains on."""
    device = next(model.parameters()).device
    y = latents["y"][None].to(device)
    with torch.no_grad():
        if isinstance(model, HyperModel):
            likelihoods = model.likelihoods(y, quality, latents["z"][None].to(device))
        else:
            likelihoods = model.likelihoods(y, quality)
        return float(sum(-torch.log2(lik).sum() for lik in likelihoods))


# ----------------------------------------------------------------------------- image files
def read_image(path):
    """Open an image file → (uint8 RGB H×W×3, mode, alpha or None, notices); ValueError if not an image."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    notices = []
    try:
        with Image.open(path) as im:
            if getattr(im, "n_frames", 1) > 1:
                notices.append(f"{path}: {im.n_frames} frames, only the first is compressed")
            im.seek(0)
            im = ImageOps.exif_transpose(im)
            im.load()
    except UnidentifiedImageError:
        raise ValueError(f"{path}: not an image file Pillow can read") from None
    except Image.DecompressionBombError as e:  # Pillow's guard stays on: refuse rather than allocate
        raise ValueError(f"{path}: {e}") from None
    except OSError as e:
        raise ValueError(f"{path}: unreadable image ({e})") from None
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im, dtype=np.float64)
        scale = 255.0 / 65535.0 if arr.max() > 255 or im.mode.startswith("I;16") else 1.0
        im = Image.fromarray(np.clip(np.round(arr * scale), 0, 255).astype(np.uint8), "L")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode == "PA":
        im = im.convert("RGBA")
    mode = im.mode if im.mode in MODES else ("L" if im.mode in ("1", "F") else "RGB")
    alpha = np.asarray(im.getchannel("A")) if mode in ("RGBA", "LA") else None
    rgb = np.asarray(im.convert("RGB"))
    return rgb, mode, alpha, notices


def write_image(path, rgb, mode="RGB", alpha=None):
    """Save uint8 RGB (plus alpha) in the original mode, atomically; format from the extension."""
    from PIL import Image

    im = Image.fromarray(rgb, "RGB")
    if mode in ("L", "LA"):
        im = im.convert("L")
    if alpha is not None:
        im.putalpha(Image.fromarray(alpha, "L"))
    fmt = Image.registered_extensions().get("." + str(path).rsplit(".", 1)[-1].lower(), "PNG")
    # PNG at zlib level 1: 3× faster to write than Pillow's default 6, and no larger on photos (measured).
    options = {"compress_level": 1} if fmt == "PNG" else {}
    atomic_write(path, lambda f: im.save(f, format=fmt, **options))


def atomic_write(path, write):
    """Call write(file) on a temporary file beside path, then rename: never a half-written path."""
    import os
    import tempfile

    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(str(path)))
    try:
        with os.fdopen(fd, "wb") as f:
            write(f) if callable(write) else f.write(write)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
