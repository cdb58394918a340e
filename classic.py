"""Classic codecs through Pillow and its plugins: name → (label, plugin module, encoder, benchmark settings).

benchmark.py measures them; demo.py shows them beside ours. Each encoder takes a PIL image and a setting
and returns the file's bytes; Pillow decodes every one of them.
"""
import io

import numpy as np
from PIL import Image


def _pillow(fmt, **opts):
    """Encoder that saves a PIL image with Pillow's `fmt` writer; `q` fills the quality option."""
    def encode(im, q):
        buf = io.BytesIO()
        kw = {k: (q if v == "Q" else v) for k, v in opts.items()}
        im.save(buf, fmt, **kw)
        return buf.getvalue()
    return encode


def plugin(module):
    """Import a Pillow plugin module (registering its formats); None with a notice if missing."""
    try:
        mod = __import__(module)
        if module == "pillow_heif":
            mod.register_heif_opener()
        return mod
    except ImportError:
        return None


# name: (label, plugin module or None, encoder, qualities). Speed settings keep all of Kodak < 20 min.
CLASSIC = {
    "jpeg420": ("JPEG 4:2:0 (libjpeg-turbo)", None, _pillow("JPEG", quality="Q", subsampling=2),
                [5, 10, 20, 30, 50, 70, 85, 95]),
    "jpeg444": ("JPEG 4:4:4 (libjpeg-turbo)", None, _pillow("JPEG", quality="Q", subsampling=0),
                [5, 10, 20, 30, 50, 70, 85, 95]),
    "webp": ("WebP (method 6)", None, _pillow("WEBP", quality="Q", method=6), [2, 10, 25, 50, 75, 90, 98]),
    "avif": ("AVIF 4:4:4 (Pillow, speed 6)", None, _pillow("AVIF", quality="Q", speed=6, subsampling="4:4:4"),
             [10, 25, 40, 55, 70, 82, 92]),
    "avif4": ("AVIF 4:4:4 (Pillow, speed 4)", None, _pillow("AVIF", quality="Q", speed=4, subsampling="4:4:4"),
              [10, 25, 40, 55, 70, 82, 92]),
    "avif2": ("AVIF 4:4:4 (Pillow, speed 2)", None, _pillow("AVIF", quality="Q", speed=2, subsampling="4:4:4"),
              [10, 25, 40, 55, 70, 82, 92]),
    "avif8": ("AVIF 4:4:4 (Pillow, speed 8)", None, _pillow("AVIF", quality="Q", speed=8, subsampling="4:4:4"),
              [10, 25, 40, 55, 70, 82, 92]),
    "jxl": ("JPEG XL (effort 5)", "pillow_jxl", _pillow("JXL", quality="Q", effort=5), [10, 30, 50, 70, 85, 93, 98]),
    "heic": ("HEIC 4:4:4 (x265, preset fast)", "pillow_heif",
             lambda im, q: _pillow("HEIF", quality="Q", chroma=444, enc_params={"preset": "fast"})(im, q),
             [10, 30, 50, 65, 80, 90, 97]),
    # irreversible=True: the lossy 9/7 wavelet (Pillow's default is the lossless 5/3 one, ~50 % worse here).
    "jpeg2000": ("JPEG 2000 (OpenJPEG, 9/7)", None,
                 lambda im, q: _pillow("JPEG2000", quality_mode="rates", quality_layers=[q], irreversible=True)(im, q),
                 [200, 120, 70, 40, 24, 14, 8]),
}


def available(name):
    """True when the codec's Pillow plugin (if it needs one) is installed and Pillow can write its format."""
    label, module, encoder, settings = CLASSIC[name]
    if module and plugin(module) is None:
        return False
    try:
        encoder(Image.new("RGB", (8, 8)), settings[len(settings) // 2])
    except (KeyError, OSError, ValueError):
        return False
    return True


def decode(data):
    """A classic codec's bytes → uint8 RGB array."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
