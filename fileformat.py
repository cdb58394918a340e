"""The .qae file format, one write / read pair (pack / unpack) with magic, version, sizes and a CRC; reading a
header needs no PyTorch (test.py info answers at once).

File layout (big-endian), version 5:

  offset size field
  0      3    magic b"QAE"
  3      1    format version (4)
  4      1    model kind: 0 = seed (B-bit, per-image table), 1 = rd (factorized prior), 2 = hyper, 3 = ctx
  5      1    entropy coder: 0 = constriction (ANS; range coder in versions 2–3), 1 = arithmetic-compressor
  6      4    model identity (first 4 bytes of SHA-256 over the checkpoint's tensors)
  10     2,2  original height, width
  14     1    original mode: 0 RGB, 1 L, 2 RGBA, 3 LA
  15     2    rate parameter: seed = B, rd = quality × 100 (tables of the nearest stored quality)
  17     2×3  latent shape C, h, w
  23     4    payload length (entropy-coded latents)
  27     4    alpha length (zlib-compressed alpha plane, 0 if none)
  31     2    tile side in latents (version 5; versions 2–4 have no such field and code one tile: the image)
  33     …    payload, then alpha
  end-4  4    CRC-32 of everything before it

The version-5 payload is the image's latents in independent tiles of that side, row after row: a table
of each tile's byte length (4 bytes each), then the tiles' coder streams one after another.

Reading never trusts the file: every size is checked against the data and against limits before
anything is allocated, and any inconsistency raises FormatError with a one-line reason.
"""
import itertools
import struct
import zlib

from encryption import MAGIC as ENCRYPTED_MAGIC, is_encrypted
from imagefiles import MODES

MAGIC = b"QAE"
# 3: hyper payloads code their smallest-scale latents sparsely; 4: ANS instead of the range coder; 5: independent
# tiles, so that coding memory is bounded by the tile, not the image
VERSION = 5
READS = (2, 3, 4, 5)
HEADER = struct.Struct(">3sBBB4sHHBHHHHIIH")
OLD_HEADER = struct.Struct(">3sBBB4sHHBHHHHII")  # versions 2–4: no tile side
KINDS = ("seed", "rd", "hyper", "ctx", "resctx")
CODERS = ("constriction", "arithmetic-compressor")
RANGE_CODER = "constriction-range"  # what "constriction" meant before version 4: read, no longer written
MAX_PIXELS = 1 << 28  # 268 M pixels: larger declared sizes are rejected before allocating
HEADER_BYTES = HEADER.size + 4
TILE_LENGTH = struct.Struct(">I")


class FormatError(ValueError):
    """A compressed file is truncated, corrupted, foreign, or made by another model."""


def pack(header, payload, alpha=b"", version=VERSION):
    """Serialise header dict + payload (+ alpha) into the file bytes, CRC-32 last; an older `version` (tests and
    the conformance corpus write them) has no tile side."""
    fields = (MAGIC, version, KINDS.index(header["kind"]), CODERS.index(header["coder"]), header["model_id"],
              header["height"], header["width"], MODES.index(header["mode"]), header["param"],
              *header["latent_shape"], len(payload), len(alpha))
    body = (HEADER.pack(*fields, header["tile"]) if version >= 5 else OLD_HEADER.pack(*fields)) + payload + alpha
    return body + struct.pack(">I", zlib.crc32(body))


def unpack(data, max_pixels=MAX_PIXELS):
    """Parse and check file bytes; returns (header dict, payload, alpha) or raises FormatError (also for a
    declared size above max_pixels: decoding needs memory in proportion to it)."""
    if len(data) < len(MAGIC) or data[: len(MAGIC)] != MAGIC:
        raise FormatError("not a QAE compressed file (wrong magic bytes)")
    layout = HEADER if len(data) > 3 and data[3] >= 5 else OLD_HEADER
    if len(data) < layout.size + 4:
        raise FormatError(f"file truncated: {len(data)} bytes is shorter than the {layout.size + 4}-byte header")
    fields = layout.unpack_from(data)
    _, version, kind, coder, mid, h, w, mode, param, c, lh, lw, n_payload, n_alpha = fields[:14]
    tile = fields[14] if len(fields) > 14 else 0  # 0: one tile, the whole image
    if version not in READS or (version < 3 and kind == KINDS.index("hyper")):
        raise FormatError(f"format version {version} is not supported for this kind of file "
                          f"(this build writes version {VERSION})")
    if layout.size + n_payload + n_alpha + 4 != len(data):
        raise FormatError(f"file truncated or padded: header declares {layout.size + n_payload + n_alpha + 4} "
                          f"bytes, file has {len(data)}")
    if zlib.crc32(data[:-4]) != struct.unpack(">I", data[-4:])[0]:
        raise FormatError("file corrupted (CRC-32 mismatch)")
    if kind >= len(KINDS) or coder >= len(CODERS) or mode >= len(MODES):
        raise FormatError("file corrupted (unknown model kind, coder or mode)")
    if h == 0 or w == 0 or c == 0 or lh == 0 or lw == 0 or (version >= 5 and (tile == 0 or tile % 4)):
        raise FormatError(f"file declares an impossible size ({w}×{h}, latent {c}×{lh}×{lw}, tile {tile})")
    if h * w > max_pixels:
        raise FormatError(f"file declares {w}×{h} = {h * w:,} pixels, more than the {max_pixels:,} this reader accepts")
    coder = CODERS[coder]
    if coder == "constriction" and version < 4:
        coder = RANGE_CODER  # the same coder byte named constriction's range coder before version 4
    header = {"kind": KINDS[kind], "coder": coder, "model_id": mid, "height": h, "width": w,
              "mode": MODES[mode], "param": param, "latent_shape": (c, lh, lw), "tile": tile, "version": version}
    payload = data[layout.size : layout.size + n_payload]
    return header, payload, data[layout.size + n_payload : layout.size + n_payload + n_alpha]


def join_tiles(parts):
    """A version-5 payload of the tiles' coder streams: their lengths (4 bytes each), then the streams."""
    return b"".join(TILE_LENGTH.pack(len(p)) for p in parts) + b"".join(parts)


def split_tiles(payload, count):
    """Inverse of join_tiles for `count` tiles: their coder streams; FormatError unless the lengths fill the
    payload exactly."""
    if TILE_LENGTH.size * count > len(payload):
        raise FormatError(f"payload corrupted ({len(payload)} bytes cannot hold the table of {count} tiles)")
    lengths = struct.unpack_from(f">{count}I", payload)
    if TILE_LENGTH.size * count + sum(lengths) != len(payload):
        raise FormatError("payload corrupted (its tiles' lengths do not add up to its size)")
    ends = list(itertools.accumulate(lengths, initial=TILE_LENGTH.size * count))
    return [payload[a:b] for a, b in zip(ends, ends[1:])]


def file_bytes(data):
    """The bytes of a .qae file given as bytes, a path or a binary file object; a file that does not start like
    one (plain or encrypted) is refused before the rest of it is read."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    if isinstance(data, str) or hasattr(data, "__fspath__"):
        with open(data, "rb") as f:
            return file_bytes(f)
    if not hasattr(data, "read"):
        raise TypeError(f"cannot read a .qae file from a {type(data).__name__}: give bytes, a path or a file object")
    head = data.read(len(MAGIC))
    if head not in (MAGIC, ENCRYPTED_MAGIC):
        raise FormatError("not a QAE compressed file (wrong magic bytes)")
    return head + data.read()


def header_info(data):
    """The header of a .qae file's bytes as a dict (model, size, mode, quality, coder, bytes, bpp, encrypted)."""
    if is_encrypted(data):
        return {"encrypted": True, "bytes": len(data)}
    header, payload, alpha = unpack(data)
    h, w = header["height"], header["width"]
    rate = {"quality": header["param"] / 100} if header["kind"] != "seed" else {"bits": header["param"]}
    return {"encrypted": False, "version": header["version"], "model": header["kind"], "model_id": header["model_id"].hex(), "width": w,
            "height": h, "mode": header["mode"], **rate, "coder": header["coder"], "bytes": len(data),
            "bpp": 8 * len(data) / (h * w), "payload_bytes": len(payload), "alpha_bytes": len(alpha)}
