"""The entropy coders and tiling: image ↔ bytes for any model (the file format itself is fileformat.py's).

The model turns an image into integer latents and those into (symbols, integer frequencies) segments
(its coding interface, models/base.py); this module never asks what kind of model it holds.

The file layout (magic, version, header fields, CRC) is fileformat.py's.

The rd payload holds, in one coder stream, each latent channel's symbols under that quality's
integer table (whose last symbol is an escape), then the escaped values themselves (Exp-Golomb,
fixed tables), so no latent is ever clamped. The hyper payload holds the side latents z the same way
(one quality-independent table per channel), then the latents grouped by their integer scale index
(computed from z by the integer hyper-synthesis), each group under its Gaussian table, then escapes.
The ctx payload holds z the same way, then slice after slice the symbols round(y − μ) coded like the
hyper latents, their means μ and scale indices computed by the integer networks from z and the slices
before (kind 3 is read by this build only: older builds reject it as an unknown kind).
Version 5 codes the image in independent tiles of TILE pixels (each tile's latents as their own
payload, behind a table of the tiles' lengths), so that coding and decoding hold one row of tiles
at a time whatever the image size; the synthesis still sees its neighbours' latents (HALO), so
tile edges do not show. Version 4 (one tile: the whole image) codes with constriction's ANS coder
(faster than its range coder both ways, same size); versions 2 and 3 (range coder; hyper payloads
only from 3) are still read. Version 1 (one table for all qualities, clamped tails) is no longer read.

Reading never trusts the file: every size is checked against the data and against limits before
anything is allocated, and any inconsistency raises FormatError with a one-line reason.
"""
import functools
import zlib

import constriction
import numpy as np
import torch
import torch.nn.functional as F
from arithmetic_compressor import arithmetic_coding as ac
from arithmetic_compressor.util import Range

from imagefiles import image_format, write_image, write_output
from imagestream import WHOLE_PIXELS, open_image, pil_rows, write_png
from effort import refine, steps_of
from quantize import PRECISION, DecodeError
# The file format lives apart so that reading a header needs no PyTorch; codec's users find it here too.
from fileformat import (CODERS, HEADER, HEADER_BYTES, KINDS, MAGIC, MAX_PIXELS, RANGE_CODER, READS,  # noqa: F401
                        VERSION, FormatError, join_tiles, pack, split_tiles, unpack)


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


@functools.lru_cache(maxsize=4096)
def _least_bits(dtype, key):
    """Fewest bits any symbol of a table (keyed like _cached_model) can cost: −log2 of its largest probability."""
    return PRECISION - float(np.log2(np.frombuffer(key, dtype).max()))


class _CountingDecoder(ac.Decoder):
    """arithmetic-compressor's decoder, counting the zero bits it makes up once its input has run out and the
    underflow steps since its last shift (the encoder drops those pending bits at its end)."""

    overread = pending = 0

    def read_code_bit(self):
        """The next input bit, or a counted 0 past the end."""
        if self.input:
            return self.input.popleft()
        self.overread += 1
        return 0

    def shift(self):
        """As the library's, after which no underflow is pending."""
        self.pending = 0
        super().shift()

    def underflow(self):
        """As the library's, counted."""
        self.pending += 1
        super().underflow()

    def used_up(self):
        """Whether the stream ended as the encoder ends one: it writes one closing bit and drops its pending bits,
        the bytes are zero-padded and this decoder reads 32 bits ahead, so a whole stream leaves the window at
        the closing bit and over-reads 31 + pending − padding bits, padding 0 … 7. Data added or removed at the
        front shows; a cut at the end mostly does not (the made-up zeros end it as the encoder would)."""
        return not self.input and self.code == self.half_range and 24 <= self.overread - self.pending <= 31


SLACK_BITS = 64  # a coder's state holds up to this many bits beyond what its symbols account for


class SymbolDecoder:
    """Reads, segment after segment, the symbols that entropy_encode wrote into one byte string.

    It never trusts the stream: a segment whose symbols could not fit in the bits left (each costs at least
    −log2 of its table's largest probability) is refused before it is decoded, so decoding work is bounded by
    the payload's size whatever the header declares; and finish() checks that the stream was used up exactly,
    so a truncated, extended or spliced payload is an error, never a picture.
    """

    def __init__(self, data, coder):
        self.coder = coder
        if coder in ("constriction", RANGE_CODER):
            if len(data) % 4:
                raise FormatError("payload corrupted (length is not a whole number of 32-bit words)")
            words = np.frombuffer(data, ">u4").astype(np.uint32)
            ans = coder == "constriction"
            self.dec = constriction.stream.stack.AnsCoder(words) if ans else constriction.stream.queue.RangeDecoder(words)
        elif coder == "arithmetic-compressor":
            self.dec = _CountingDecoder(np.unpackbits(np.frombuffer(data, np.uint8)).tolist(), numbits=32)
        else:
            raise ValueError(f"unknown entropy coder {coder!r} (choose from {', '.join(CODERS)})")
        self.bits = 8 * len(data)  # what the payload can pay for (the range coder's own position is not exposed)
        self.spent = 0.0  # the least the symbols decoded so far must have cost

    def take(self, freqs, n):
        """The next n symbols, coded with the integer frequencies freqs, as int32."""
        if len(freqs) < 2 or n == 0:
            return np.zeros(n, np.int32)  # a one-symbol alphabet costs nothing and is not coded
        freqs = np.asarray(freqs)
        key = (freqs.dtype.str, freqs.tobytes())
        self.spent += n * _least_bits(*key)
        if self.spent > self.bits + SLACK_BITS:
            raise FormatError(f"payload corrupted (its {self.bits // 8} bytes cannot hold the "
                              f"symbols the file declares)")
        if self.coder != "arithmetic-compressor":
            return self.dec.decode(_cached_model(*key), n).astype(np.int32, copy=False)
        table = _ac_table(freqs)
        return np.array([self.dec.decode_symbol(table) for _ in range(n)], np.int32)

    def finish(self):
        """Raise FormatError unless the stream was used up exactly (ANS: back to empty; arithmetic coder: at
        most its look-ahead and the byte padding left unread)."""
        if self.coder == "constriction":
            done = self.dec.is_empty()
        elif self.coder == "arithmetic-compressor":
            done = self.dec.used_up()
        else:
            done = True  # the range coder (read-only versions 2–3) does not tell where its data ends
        if not done:
            raise FormatError("payload corrupted (data left over after the last symbol)")


def entropy_decode(data, tables, counts, coder):
    """Inverse of entropy_encode: decode counts[i] symbols with tables[i]; list of int32 arrays."""
    dec = SymbolDecoder(data, coder)
    symbols = [dec.take(freqs, n) for freqs, n in zip(tables, counts)]
    dec.finish()
    return symbols


# ----------------------------------------------------------------------------- image ↔ bytes
TILE = 1024  # pixels: the side of the independent tiles an image is coded in, which bounds coding memory
MIN_TILE, MAX_TILE = 256, 1024  # the tile sides (pixels) a reader accepts: bounds on work per tile and memory
HALO = 64  # pixels of context on each side of a tile (≥ the rd analysis transform's 61-px receptive field)


def _spans(n, tile, halo):
    """(start, end, start with halo, end with halo) of the tiles covering 0 … n."""
    return [(a, min(a + tile, n), max(0, a - halo), min(n, a + tile + halo)) for a in range(0, n, tile)]


def tile_grid(shape, tile):
    """The latent spans ((r0, r1), (c0, c1)) of the tiles of latents of shape (C, h, w), row after row."""
    rows, cols = (_spans(n, tile, 0) for n in shape[1:])
    return [[((r0, r1), (c0, c1)) for c0, c1, _, _ in cols] for r0, r1, _, _ in rows]


def _device(model):
    """The device the model's weights are on."""
    return next(model.parameters()).device


def _analysed(model, rgb, rows, cols):
    """The model's analysis output (C, r1 − r0, c1 − c0) of the latent rows × cols of an image (on the CPU), from
    its pixels with HALO pixels of context; the image is replicate-padded to a multiple of the stride."""
    s = model.stride
    ph, pw = (-(-n // s) * s for n in rgb.shape[:2])
    ya, yb, xa, xb = max(0, rows[0] * s - HALO), min(ph, rows[1] * s + HALO), max(0, cols[0] * s - HALO), min(pw, cols[1] * s + HALO)
    x = torch.from_numpy(np.array(rgb[ya:yb, xa:xb]))  # a copy: Pillow arrays are read-only
    x = x.permute(2, 0, 1)[None].float() / 255.0
    x = F.pad(x, (0, xb - xa - x.shape[-1], 0, yb - ya - x.shape[-2]), mode="replicate")
    x = x.to(_device(model)).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        u = model.analyse(x)[0].cpu()
    return u[:, rows[0] - ya // s : rows[1] - ya // s, cols[0] - xa // s : cols[1] - xa // s]


def analysis_of(model, rgb):
    """The model's analysis output of a whole image (C, h, w) on the CPU, computed tile by tile."""
    shape = model.latent_shape(*rgb.shape[:2])
    return torch.cat([torch.cat([_analysed(model, rgb, rows, cols) for rows, cols in row], 2)
                      for row in tile_grid(shape, TILE // model.stride)], 1)


def latents_of(model, rgb, quality, u=None):
    """Integer latents as the model's dict ("y" (C, h, w), and whatever else it codes), on the CPU: of the analysis
    output u (on the model's device) if given, else of the whole image as one tile (the format before version
    5); quality as the model's quality_of returns it."""
    u = analysis_of(model, rgb).to(_device(model)) if u is None else u
    return {k: v.cpu() for k, v in model.latents(u, quality).items()}


def _synthesized(model, band, height, width, quality):
    """uint8 RGB (≤ height, width, 3) of a band of latent rows given as (rows above, rows, rows below) (C, ·, w),
    those above and below being context; in TILE-wide tiles with HALO of context."""
    s, device, (above, y, _) = model.stride, _device(model), band
    top, rows = above.shape[1], y.shape[1]
    out = np.empty((min(rows * s, height), width, 3), np.uint8)
    for x0, x1, xa, xb in _spans(y.shape[2], TILE // s, HALO // s):
        z = torch.cat([part[None, :, :, xa:xb] for part in band], 2).float().to(device)
        z = z.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            x = model.synthesize(z, quality)
        x = x[0, :, top * s : (top + rows) * s, (x0 - xa) * s : (x1 - xa) * s]
        x = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        ww = min(x1 * s, width) - x0 * s
        out[:, x0 * s : x0 * s + ww] = x[: out.shape[0], :ww]
    return out


def _strips(model, latent_rows, height, width, quality):
    """(first pixel row, uint8 RGB strip) of an image from its latents given as (first latent row, rows (C, r, w))
    top to bottom: each synthesized with HALO of context from the rows before and after, so only three are held."""
    hl, before, rows = HALO // model.stride, None, iter(latent_rows)
    current = next(rows, None)
    while current is not None:
        following = next(rows, None)
        r0, y = current
        above = y[:, :0] if before is None else before
        below = y[:, :0] if following is None else following[1][:, :hl]
        yield r0 * model.stride, _synthesized(model, (above, y, below), height - r0 * model.stride, width, quality)
        before, current = y[:, -hl:].clone(), following  # a copy: a view would keep all of y


def image_of(model, latents, height, width, quality):
    """Reconstruct uint8 RGB (H, W, 3) from a whole image's latents dict, rounding and clamping; in tiles."""
    y, t = latents["y"], TILE // model.stride
    out = np.empty((height, width, 3), np.uint8)
    for r, strip in _strips(model, ((r, y[:, r : r + t]) for r in range(0, y.shape[1], t)), height, width, quality):
        out[r : r + strip.shape[0]] = strip
    return out


def encoder_of(coder):
    """encode(segments) → bytes with the named entropy coder: what a model's write_latents is given."""
    if coder not in CODERS:
        raise ValueError(f"unknown entropy coder {coder!r} (choose from {', '.join(CODERS)})")
    return lambda segments: entropy_encode(segments, coder)


@torch.inference_mode(False)  # the caller's autograd mode is not ours: ctx keeps tensor versions
def compress(model, model_id, rgb, mode="RGB", alpha=None, quality=None, coder="constriction", effort=0,
             progress=None):
    """Image (uint8 H×W×3, or a RowReader; original mode; optional H×W alpha, or a function returning it packed
    once the rows are read) → file bytes; quality as the model takes it.
    The image is coded in independent TILE-pixel tiles; effort > 0 searches each for cheaper latents
    (effort.py). `progress(done, total)` is called after each search step and each tile."""
    h, w = rgb.shape[:2]
    if not (1 <= h <= 0xFFFF and 1 <= w <= 0xFFFF):
        raise ValueError(f"image of {w}×{h} pixels: each side must be 1 … 65535")
    if h * w > MAX_PIXELS:  # a file that readers refuse by default is not written
        raise ValueError(f"image of {w}×{h} = {h * w:,} pixels: at most {MAX_PIXELS:,} are coded")
    encode, (full, side) = encoder_of(coder), steps_of(effort, bool(model.SIDE_KEYS))
    param = model.rate_param(quality)
    quality, s, tile = model.quality_of(param), model.stride, TILE // model.stride
    shape = model.latent_shape(h, w)
    tiles = [t for row in tile_grid(shape, tile) for t in row]
    work, parts = full + side + 1, []  # per tile: its search steps, then its coding
    tick = progress or (lambda done, total: None)
    for k, (rows, cols) in enumerate(tiles):
        u = _analysed(model, rgb, rows, cols).to(_device(model))
        latents = latents_of(model, rgb, quality, u)
        if effort:
            crop = rgb[rows[0] * s : rows[1] * s, cols[0] * s : cols[1] * s]
            step = lambda d, n, k=k: tick(k * work + d, len(tiles) * work)  # noqa: E731
            latents = refine(model, latents, model.relaxed_latents(u, quality), crop, quality, effort, step)
        parts.append(model.write_latents(latents, quality, encode))
        tick((k + 1) * work, len(tiles) * work)
    header = {"kind": model.cfg.kind, "coder": coder, "model_id": model_id, "height": h, "width": w,
              "mode": mode, "param": param, "latent_shape": shape, "tile": tile}
    packed_alpha = b"" if alpha is None else alpha() if callable(alpha) else zlib.compress(
        np.ascontiguousarray(alpha, np.uint8).tobytes(), 9)
    return pack(header, join_tiles(parts), packed_alpha)


def _opened(model, model_id, data, max_pixels):
    """(header, tiles, quality, packed alpha) of file bytes checked against the model: tiles row after row as
    (latent rows, latent columns, coder stream); FormatError for any bad file or one declaring more than max_pixels."""
    header, payload, alpha = unpack(data, max_pixels)
    if header["model_id"] != model_id:
        raise FormatError(f"file was made by model {header['model_id'].hex()}, "
                          f"but the loaded weights are {model_id.hex()}")
    h, w, tile = header["height"], header["width"], header["tile"]
    shape = model.latent_shape(h, w)
    if header["kind"] != model.cfg.kind or tuple(header["latent_shape"]) != shape:
        raise FormatError(f"file corrupted (latent shape {header['latent_shape']} does not fit a {w}×{h} image)")
    try:
        quality = model.quality_of(header["param"])
    except ValueError as e:
        raise FormatError(f"file corrupted ({e})") from None
    if not tile:  # before version 5: one tile, the whole image
        return header, [[((0, shape[1]), (0, shape[2]), payload)]], quality, alpha
    if not MIN_TILE <= tile * model.stride <= MAX_TILE:
        raise FormatError(f"file corrupted (tiles of {tile * model.stride} pixels: {MIN_TILE} … {MAX_TILE} are read)")
    grid = tile_grid(shape, tile)
    streams = iter(split_tiles(payload, sum(map(len, grid))))
    return header, [[(rows, cols, next(streams)) for rows, cols in row] for row in grid], quality, alpha


def _read_tile(model, header, quality, rows, cols, payload):
    """One tile's latents dict from its coder stream, which must be used up exactly; FormatError otherwise."""
    shape, opened = (header["latent_shape"][0], rows[1] - rows[0], cols[1] - cols[0]), []

    def open_decoder(payload):
        opened.append(SymbolDecoder(payload, header["coder"]))
        return opened[-1]

    try:
        latents = model.read_latents(payload, shape, quality, open_decoder)
        for dec in opened:
            dec.finish()
    except FormatError:
        raise
    except DecodeError as e:
        raise FormatError(str(e)) from None
    except Exception as e:  # the entropy decoders' own errors on garbage input
        raise FormatError(f"payload corrupted ({type(e).__name__})") from None
    return latents


def _row_latents(model, header, quality, row):
    """A row of tiles decoded and joined: the latents dict of the rows they span."""
    tiles = [_read_tile(model, header, quality, *tile) for tile in row]
    return {k: torch.cat([t[k] for t in tiles], -1) for k in tiles[0]}


def _row_y(model, header, quality, row):
    """A row of tiles decoded for synthesis: "y" alone as float32, each tile converted as it comes, so a row
    costs its float32 latents and one tile more."""
    return torch.cat([_read_tile(model, header, quality, *tile)["y"].float() for tile in row], -1)


@torch.inference_mode(False)  # the caller's autograd mode is not ours: ctx keeps tensor versions
def read_latents(model, model_id, data, max_pixels=MAX_PIXELS):
    """File bytes → (header, the whole image's latents dict, quality); FormatError for any bad file or one
    declaring more than max_pixels.

    Only integer tables decide the symbols, so the latents are bit-identical on every machine.
    """
    header, tiles, quality, _ = _opened(model, model_id, data, max_pixels)
    rows = [_row_latents(model, header, quality, row) for row in tiles]
    return header, {k: torch.cat([r[k] for r in rows], -2) for k in rows[0]}, quality


@torch.inference_mode(False)  # the caller's autograd mode is not ours: ctx keeps tensor versions
def canonical_payload(model, model_id, data, max_pixels=MAX_PIXELS):
    """The payload the encoder writes for the latents a file decodes to. An ANS payload ends exactly where its
    symbols end, so a file of the current coder whose payload differs from this one was damaged."""
    header, tiles, quality, _ = _opened(model, model_id, data, max_pixels)
    encode = functools.partial(entropy_encode, coder=header["coder"])  # the file's own coder, read-only ones too
    parts = [model.write_latents(_read_tile(model, header, quality, *tile), quality, encode) for row in tiles for tile in row]
    return join_tiles(parts) if header["tile"] else parts[0]


def _alpha_rows(header, packed):
    """take(n) → the next n rows (uint8 (n, W)) of the alpha plane packed as zlib bytes, or None for a file
    without alpha; FormatError when the plane is damaged or does not hold exactly H × W values. Inflated as
    asked for."""
    if header["mode"] not in ("RGBA", "LA"):
        return lambda n: None
    w, rows_left, d = header["width"], header["height"], zlib.decompressobj()

    def take(n):
        nonlocal packed, rows_left
        try:
            raw = d.decompress(packed, n * w)  # bounded: never inflates more than the rows asked for
            packed, rows_left = d.unconsumed_tail, rows_left - n
            extra = d.decompress(packed, 1) if rows_left == 0 else b""  # the plane must end with its last row
        except zlib.error:
            raise FormatError("alpha plane corrupted") from None
        if len(raw) != n * w or extra or (rows_left == 0 and not d.eof):
            raise FormatError("alpha plane corrupted (wrong size)")
        return np.frombuffer(raw, np.uint8).reshape(n, w)
    return take


@torch.inference_mode(False)  # the caller's autograd mode is not ours: ctx keeps tensor versions
def decoded_strips(model, model_id, data, max_pixels=MAX_PIXELS, progress=None):
    """File bytes → (header, strips): strips yields (first row, uint8 RGB (n, W, 3), alpha (n, W) or None) top to
    bottom, decoding a row of tiles at a time, so only three rows of latents are held; `progress(done, total)`
    after each row of tiles decoded and each strip synthesized. FormatError for any bad file (when it is opened,
    or at the strip that is damaged) or one declaring more than max_pixels."""
    header, tiles, quality, packed_alpha = _opened(model, model_id, data, max_pixels)
    h, w, t = header["height"], header["width"], TILE // model.stride
    steps, done = len(tiles) + -(-header["latent_shape"][1] // t), 0

    def tick():
        nonlocal done
        done += 1
        if progress:
            progress(done, steps)

    def latent_rows():
        """(first latent row, decoded latents "y" as float32) in rows of at most TILE pixels."""
        for row in tiles:
            r0, y = row[0][0][0], _row_y(model, header, quality, row)
            tick()
            yield from ((r0 + r, y[:, r : r + t]) for r in range(0, y.shape[1], t))

    @torch.inference_mode(False)  # around each step of the generator, not just its creation
    def strips():
        alpha = _alpha_rows(header, packed_alpha)
        for r, rgb in _strips(model, latent_rows(), h, w, quality):
            yield r, rgb, alpha(len(rgb))
            tick()
    return header, strips()


def decompress(model, model_id, data, max_pixels=MAX_PIXELS, progress=None):
    """File bytes → (uint8 H×W×3, mode, alpha or None); FormatError for any bad file or one declaring more
    than max_pixels. Decoded as decoded_strips gives it."""
    return _assembled(*decoded_strips(model, model_id, data, max_pixels, progress))


def _assembled(header, strips):
    """decoded_strips' strips joined: (uint8 H×W×3, mode, alpha or None)."""
    h, w = header["height"], header["width"]
    rgb, alpha = np.empty((h, w, 3), np.uint8), None
    if header["mode"] in ("RGBA", "LA"):
        alpha = np.empty((h, w), np.uint8)
    for r, strip, alpha_strip in strips:
        rgb[r : r + len(strip)] = strip
        if alpha is not None:
            alpha[r : r + len(strip)] = alpha_strip
    return rgb, header["mode"], alpha


def compress_file(model, model_id, src, dst, quality=None, coder="constriction", seal=None, effort=0, progress=None):
    """Image file src (a path or a binary file object) → compressed file dst, written atomically ("-":
    standard output): (file bytes, the reader's notices). A large image is read a band of rows at a time
    (imagestream.open_image). `seal` (optional) transforms the bytes before they are written: test.py's
    encryption."""
    rgb, mode, alpha, notices = open_image(src)
    data = compress(model, model_id, rgb, mode, alpha, quality, coder, effort, progress)
    if seal is not None:
        data = seal(data)
    write_output(dst, data)
    return data, notices


def decompress_file(model, model_id, data, dst, progress=None):
    """Compressed file bytes → image file dst (format from its extension; "-": PNG on standard output), written
    atomically; `progress(done, total)` as decoded_strips reports it. An image larger than WHOLE_PIXELS written
    as PNG goes out row after row and is never held whole: None is returned; otherwise the decoded RGB array."""
    header, strips = decoded_strips(model, model_id, data, progress=progress)
    if header["height"] * header["width"] <= WHOLE_PIXELS or (image_format(dst) or "PNG") != "PNG":
        rgb, mode, alpha = _assembled(header, strips)
        write_image(dst, rgb, mode, alpha)
        return rgb
    rows = (pil_rows(rgb, header["mode"], alpha) for _, rgb, alpha in strips)
    write_output(dst, lambda f: write_png(f, header["width"], header["height"], header["mode"], rows))
    return None
