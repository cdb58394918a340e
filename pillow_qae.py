"""Pillow plugin for .qae files: after `import pillow_qae`, Image.open("photo.qae") decodes and
im.save("photo.qae", quality=4) encodes, with the shipped default model (like pillow-heif and
pillow-jxl-plugin do for their formats).

    import pillow_qae  # noqa: F401  (registers the format)
    from PIL import Image
    Image.open("photo.jpg").save("photo.qae", quality=4)
    Image.open("photo.qae").save("back.png")
"""
from PIL import Image, ImageFile

import codec
import qae


def _accept(prefix):
    """Pillow's sniffing: the first bytes of a (plain, not encrypted) .qae file."""
    return prefix[: len(codec.MAGIC)] == codec.MAGIC


class QaeImageFile(ImageFile.ImageFile):
    """A .qae file opened by Pillow: the header gives size and mode at once; pixels are decoded on load()."""

    format = "QAE"
    format_description = "QAE learned image codec"

    def _open(self):
        """Read the whole file and its header (FormatError, a ValueError, for a bad one)."""
        self._data = self.fp.read()
        header = qae.info(self._data)
        self._size, self._mode = (header["width"], header["height"]), header["mode"]
        self.info.update({k: header[k] for k in ("model", "model_id", "coder") if k in header})
        self.tile = []

    def load(self):
        """Decode the pixels (once)."""
        if self._data is not None:
            decoded = qae.decompress(self._data)
            self._data = None
            self.im = decoded.im
        return Image.Image.load(self)


def _save(im, fp, filename):
    """Pillow's writer: im.save(..., quality=Q, effort=E, coder=...) with the shipped default model."""
    options = im.encoderinfo
    fp.write(qae.compress(im, quality=options.get("quality"), effort=options.get("effort", qae.DEFAULT_EFFORT),
                          coder=options.get("coder", "constriction")))


Image.register_open(QaeImageFile.format, QaeImageFile, _accept)
Image.register_save(QaeImageFile.format, _save)
Image.register_extension(QaeImageFile.format, ".qae")
Image.register_mime(QaeImageFile.format, "image/x-qae")
