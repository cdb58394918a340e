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


# name: (label, plugin module or None, encoder, qualities). The plain names are each codec at its PSNR-best
# practical setting (measured with tools/anchor_settings.py, docs/results.md), the fair anchors of a PSNR
# comparison; "-stock" names are the same encoders at their stock settings, what a user of a default gets.
# Down to ~25 dB on Kodak, where our lowest quality is: a head-to-head BD-rate covers only the PSNR range both
# curves share, so an anchor that starts higher would leave our strongest range out of the comparison.
AVIF_Q = [2, 5, 10, 25, 40, 55, 70, 82, 92]
HEIC_Q = [2, 5, 10, 30, 50, 65, 80, 90, 97]
JXL_Q = [1, 5, 10, 30, 50, 70, 85, 93, 98]


def _avif(speed, **opts):
    """libavif (libaom) 4:4:4, 8-bit (Pillow writes no more), full range; `advanced` goes to the encoder."""
    return _pillow("AVIF", quality="Q", speed=speed, subsampling="4:4:4", **opts)


def _heic(**enc_params):
    """libheif with x265 at 4:4:4, 8-bit; enc_params are x265's (pillow-heif changes the dict: a copy each call)."""
    return lambda im, q: _pillow("HEIF", quality="Q", chroma=444, enc_params=dict(enc_params))(im, q)


PSNR = {"tune": "psnr"}
CLASSIC = {
    "jpeg420": ("JPEG 4:2:0 (libjpeg-turbo)", None, _pillow("JPEG", quality="Q", subsampling=2),
                [5, 10, 20, 30, 50, 70, 85, 95]),
    "jpeg444": ("JPEG 4:4:4 (libjpeg-turbo)", None, _pillow("JPEG", quality="Q", subsampling=0),
                [5, 10, 20, 30, 50, 70, 85, 95]),
    "webp": ("WebP (method 6)", None, _pillow("WEBP", quality="Q", method=6), [2, 10, 25, 50, 75, 90, 98]),
    "avif": ("AVIF 4:4:4 (libaom, speed 6, tune psnr)", None, _avif(6, advanced=PSNR), AVIF_Q),
    "avif4": ("AVIF 4:4:4 (libaom, speed 4, tune psnr)", None, _avif(4, advanced=PSNR), AVIF_Q),
    "avif2": ("AVIF 4:4:4 (libaom, speed 2, tune psnr)", None, _avif(2, advanced=PSNR), AVIF_Q),
    "avif8": ("AVIF 4:4:4 (libaom, speed 8, tune psnr)", None, _avif(8, advanced=PSNR), AVIF_Q),
    "avif-stock": ("AVIF 4:4:4 (libaom, speed 6, stock tune)", None, _avif(6), AVIF_Q),
    "avif4-stock": ("AVIF 4:4:4 (libaom, speed 4, stock tune)", None, _avif(4), AVIF_Q),
    "jxl": ("JPEG XL (libjxl, effort 9)", "pillow_jxl", _pillow("JXL", quality="Q", effort=9), JXL_Q),
    "jxl-stock": ("JPEG XL (libjxl, effort 7, stock)", "pillow_jxl", _pillow("JXL", quality="Q"), JXL_Q),
    "heic": ("HEIC 4:4:4 (x265, preset slow, tune psnr)", "pillow_heif", _heic(preset="slow", tune="psnr"), HEIC_Q),
    "heic-stock": ("HEIC 4:4:4 (x265, stock: preset slow, tune ssim)", "pillow_heif", _heic(), HEIC_Q),
    "heic-fast": ("HEIC 4:4:4 (x265, preset fast, tune psnr)", "pillow_heif", _heic(preset="fast", tune="psnr"), HEIC_Q),
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
