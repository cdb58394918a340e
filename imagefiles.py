"""Image files: reading (any format Pillow opens), writing atomically, listing folders.

Every script reads and writes images through this module.
"""
import os
import struct
import sys
import tempfile

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".gif")
MODES = ("RGB", "L", "RGBA", "LA")  # the modes a compressed file keeps


def list_images(folder):
    """Sorted paths of the image files under a folder (recursively)."""
    paths = []
    for root, _, files in os.walk(folder):
        paths += [os.path.join(root, f) for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(paths)


def output_name(path, root):
    """A file's name for its outputs: its path under root without the extension (subfolders mirrored)."""
    return os.path.splitext(os.path.relpath(path, root))[0]


def read_rgb(path, max_side=None):
    """An image file as uint8 RGB (H, W, 3), EXIF orientation applied, area-downscaled so that its long
    side is at most max_side; ValueError if it is not an image."""
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im).convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"{path}: not a readable image ({e})") from None
    if max_side and max(im.size) > max_side:
        s = max_side / max(im.size)
        im = im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))), Image.Resampling.BOX)
    return np.asarray(im)


def read_image(path):
    """Open an image file (a path, or a binary file object) → (uint8 RGB H×W×3, mode, alpha or None, notices);
    ValueError if it is not an image."""
    notices, name = [], getattr(path, "name", path)
    try:
        with Image.open(path) as im:
            if getattr(im, "n_frames", 1) > 1:
                notices.append(f"{name}: {im.n_frames} frames, only the first is compressed")
            im.seek(0)
            im = ImageOps.exif_transpose(im)
            im.load()
    except UnidentifiedImageError:
        raise ValueError(f"{name}: not an image file Pillow can read") from None
    except Image.DecompressionBombError as e:  # Pillow's guard stays on: refuse rather than allocate
        raise ValueError(f"{name}: {e}") from None
    except OSError as e:
        raise ValueError(f"{name}: unreadable image ({e})") from None
    except (SyntaxError, TypeError, ValueError, KeyError, IndexError, struct.error, EOFError, ZeroDivisionError) as e:
        # What Pillow's readers raise on malformed files besides OSError (found by tools/fuzz.py images).
        raise ValueError(f"{name}: unreadable image ({type(e).__name__}: {e})") from None
    rgb, mode, alpha = image_arrays(im)
    if im.mode not in MODES:  # what the decoded file will not give back as it was
        notices.append(f"{name}: a {MODE_NAMES.get(im.mode, im.mode)} image is coded and decoded as {mode}")
    return rgb, mode, alpha, notices


MODE_NAMES = {"1": "1-bit", "P": "palette", "PA": "palette + alpha", "CMYK": "CMYK", "YCbCr": "YCbCr", "LAB": "Lab",
              "HSV": "HSV", "I;16": "16-bit", "I;16B": "16-bit", "I;16L": "16-bit", "I": "32-bit integer", "F": "float"}


def image_arrays(im):
    """A loaded PIL image → (uint8 RGB H×W×3, mode kept in the file, alpha H×W or None)."""
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
    return np.asarray(im.convert("RGB")), mode, alpha


def to_pil(rgb, mode="RGB", alpha=None):
    """Inverse of image_arrays: a PIL image in the original mode."""
    im = Image.fromarray(rgb, "RGB")
    if mode in ("L", "LA"):
        im = im.convert("L")
    if alpha is not None:
        im.putalpha(Image.fromarray(alpha, "L"))
    return im


def image_format(path):
    """Pillow's format name for a file name's extension, or None when no writer is registered for it."""
    fmt = Image.registered_extensions().get(os.path.splitext(str(path))[1].lower())
    return fmt if fmt in Image.SAVE else None


# Formats that keep every pixel of an 8-bit image at its size. The others lose detail a second time (JPEG,
# WebP, …), reduce colours (GIF), cap the size (ICO: 256×256) or wrap a lossy codec (MPO, PDF: JPEG inside).
LOSSLESS_FORMATS = ("PNG", "TIFF", "BMP", "PPM", "TGA", "QOI", "SGI", "DIB", "PCX")


def save_image(f, im, fmt):
    """Write a PIL image to a binary file object in a Pillow format."""
    # PNG at zlib level 1: 3× faster to write than Pillow's default 6, and no larger on photos (measured).
    im.save(f, format=fmt, **({"compress_level": 1} if fmt == "PNG" else {}))


def write_image(path, rgb, mode="RGB", alpha=None):
    """Save uint8 RGB (plus alpha) in the original mode, atomically; format from the extension (PNG if none,
    and for "-", standard output)."""
    im, fmt = to_pil(rgb, mode, alpha), image_format(path) or "PNG"
    write_output(path, lambda f: save_image(f, im, fmt))


def write_output(path, write):
    """atomic_write, except that "-" means standard output."""
    if path != "-":
        return atomic_write(path, write)
    out = sys.stdout.buffer
    write(out) if callable(write) else out.write(write)
    out.flush()


def atomic_write(path, write):
    """Call write(file) on a temporary file beside path, then rename: never a half-written path.

    The file gets the permissions any program's output gets (0666 less the umask), not mkstemp's 0600.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    # A short name (not the output's own name plus a prefix): any name the folder allows for path fits.
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.splitext(str(path))[1][:8])
    except OSError as e:  # name the output asked for, not the temporary file beside it
        raise OSError(e.errno, f"cannot write {path}: {e.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f) if callable(write) else f.write(write)
            f.flush()
            os.fsync(f.fileno())
            os.fchmod(f.fileno(), 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def current_umask():
    """The process's umask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
