"""Large images in rows: read through libvips a band of rows at a time, written as PNG row after row, so that
coding an image of any size holds a few bands of it, never the whole.

Images of at most WHOLE_PIXELS pixels, and those libvips cannot stream as 8-bit RGB / L (+ alpha), go through
imagefiles' whole-image path instead.
"""
import os
import struct
import zlib

import numpy as np

from imagefiles import read_image, to_pil

WHOLE_PIXELS = 1024 * 1024  # larger images stream (one coding tile: what costs the same memory either way)
BANDS = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}  # libvips' band counts of 8-bit images → our modes
PNG_COLOUR = {"L": 0, "RGB": 2, "LA": 4, "RGBA": 6}  # PNG colour types
FILTER_ROWS = 32  # rows filtered at a time: the predictor's int16 temporaries are ~20 bytes a sample
PNG_LEVEL = 1  # zlib level of the rows: as imagefiles.save_image writes PNG (3× faster than 6, no larger)


class RowReader:
    """An image file read top to bottom in bands of rows: sliced like a uint8 (H, W, 3) array whose row range
    only moves forward; its alpha plane (if any) is packed as its rows go by."""

    def __init__(self, image, mode):
        self.image, self.mode = image, mode
        self.shape = (image.height, image.width, 3)
        self.top, self.rows = 0, np.empty((0, image.width, 3), np.uint8)  # the band held: rows top … top + len
        self.packer = zlib.compressobj(9) if mode in ("RGBA", "LA") else None
        self.alpha_bytes = []

    def _read_to(self, end):
        """Read the rows up to `end` (exclusive) that are not read yet, packing their alpha."""
        start = self.top + len(self.rows)
        if end <= start:
            return
        px = self.image.crop(0, start, self.image.width, end - start).numpy().reshape(end - start, self.image.width, -1)
        colour = px[..., :1].repeat(3, 2) if self.mode in ("L", "LA") else px[..., :3]
        if self.packer:
            self.alpha_bytes.append(self.packer.compress(np.ascontiguousarray(px[..., -1]).tobytes()))
        self.rows = np.concatenate([self.rows, colour])

    def __getitem__(self, index):
        """rows[a:b, c:d] (plain slices); rows before the band last read are gone."""
        rows, cols = index
        start, end = max(0, rows.start or 0), min(self.shape[0], self.shape[0] if rows.stop is None else rows.stop)
        if start < self.top:
            raise ValueError(f"rows from {start} asked for after row {self.top}: the image is read once, top to bottom")
        if end > self.top + len(self.rows):  # a new band: drop the rows above it, read the rows below
            self.rows, self.top = self.rows[start - self.top :], start
            self._read_to(end)
        return self.rows[start - self.top : end - self.top, cols]

    def packed_alpha(self):
        """The zlib-packed alpha plane, once every row is read (any left are read now)."""
        self._read_to(self.shape[0])
        self.rows, self.top = self.rows[:0], self.shape[0]
        return b"".join(self.alpha_bytes) + self.packer.flush()


def open_image(path):
    """(RGB, mode, alpha, notices) of an image file as read_image gives them; a file path larger than WHOLE_PIXELS
    that libvips reads as 8-bit L / RGB (+ alpha) comes as a RowReader (alpha: a function returning the packed
    plane, once the rows are read)."""
    image = _streamable(path)
    if image is None:
        return read_image(path)
    reader = RowReader(image, BANDS[image.bands])
    return reader, reader.mode, (reader.packed_alpha if reader.packer else None), []


def _streamable(path):
    """A libvips image of the file, upright, if it is a path larger than WHOLE_PIXELS whose pixels are kept as
    they are (8-bit grey or sRGB, with or without alpha, one page, no palette); else None."""
    if not isinstance(path, (str, os.PathLike)):
        return None
    import pyvips

    try:
        image = pyvips.Image.new_from_file(os.fspath(path), access="sequential")  # the header only, so far
        fields = {k: image.get(k) for k in ("n-pages", "palette", "bits-per-sample", "orientation")
                  if image.get_typeof(k)}
        if (image.width * image.height <= WHOLE_PIXELS or image.format != "uchar" or image.bands not in BANDS
                or image.interpretation not in ("srgb", "b-w") or fields.get("n-pages", 1) != 1
                or fields.get("palette") or fields.get("bits-per-sample", 8) != 8):
            return None
        if fields.get("orientation", 1) != 1:  # turning it upright needs the whole image (libvips keeps it on disk)
            image = pyvips.Image.new_from_file(os.fspath(path)).autorot()
    except pyvips.Error:  # not an image libvips reads: the whole-image path says why, or reads it
        return None
    return image


def _chunk(kind, data):
    """One PNG chunk: length, type, data, CRC."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def write_png(f, width, height, mode, strips):
    """Write a PNG of `mode` (L, LA, RGB, RGBA) to a binary file from `strips` of uint8 rows (n, width, channels)
    given top to bottom, each filtered (Paeth, as Pillow chooses for photos) and deflated as it comes."""
    channels = len(mode)
    f.write(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, PNG_COLOUR[mode], 0, 0, 0)))
    deflate, above, done = zlib.compressobj(PNG_LEVEL), np.zeros((1, width * channels), np.uint8), 0
    for strip in strips:
        strip = np.ascontiguousarray(strip, np.uint8).reshape(len(strip), width * channels)
        for r in range(0, len(strip), FILTER_ROWS):
            rows = strip[r : r + FILTER_ROWS]
            f.write(_chunk(b"IDAT", deflate.compress(paeth(rows, above, channels).tobytes())))
            above, done = rows[-1:], done + len(rows)
    if done != height:
        raise ValueError(f"{done} rows written to a PNG of {height}")
    f.write(_chunk(b"IDAT", deflate.flush()) + _chunk(b"IEND", b""))


def paeth(rows, above, channels):
    """PNG filter 4 (Paeth) of uint8 rows (n, W·channels) under the row above the first: a filter byte (4), then
    each byte's difference from the predictor of its left, upper and upper-left neighbours (0 outside)."""
    x = rows.astype(np.int16)
    b = np.concatenate([above, rows[:-1]]).astype(np.int16)
    a, c = np.zeros_like(x), np.zeros_like(x)
    a[:, channels:], c[:, channels:] = x[:, :-channels], b[:, :-channels]
    p = a + b - c
    pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
    predicted = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))
    out = np.empty((len(rows), rows.shape[1] + 1), np.uint8)
    out[:, 0], out[:, 1:] = 4, (x - predicted).astype(np.uint8)
    return out


def pil_rows(rgb, mode, alpha):
    """A strip of uint8 RGB (and alpha rows) in the file's mode, as imagefiles.to_pil converts a whole image."""
    return rgb if mode == "RGB" else np.asarray(to_pil(rgb, mode, alpha))
