"""Python API: images to .qae bytes and back.

    import qae
    data = qae.compress("photo.png", quality=4)      # a path, a file object, a PIL image or a uint8 array
    data = qae.compress("photo.png", quality=4, effort=5)   # search longer for a smaller file
    image = qae.decompress(data)                    # a PIL image in the original size and mode
    qae.info(data)                                  # the header, without decoding
    codec = qae.Codec("weights/rd.pt")              # one checkpoint, loaded once, for many images

Decompressing finds the checkpoint that made a file (by the identity the file carries) among the
shipped weights, or in the folder given as `weights_dir`.
"""
import os

import numpy as np
from PIL import Image

import codec
from effort import DEFAULT as DEFAULT_EFFORT
from checkpoint import DEFAULT_WEIGHTS, WEIGHTS_DIR, find_checkpoint, load_checkpoint
from encryption import DecryptionError, decrypt, encrypt, is_encrypted
from fileformat import file_bytes, header_info
from imagefiles import image_arrays, read_image, to_pil

FormatError = codec.FormatError  # every bad file raises this one type (a ValueError)
ARRAY_MODES = {1: "L", 3: "RGB", 4: "RGBA"}  # channels of a uint8 array: H×W (or H×W×1), H×W×3, H×W×4


def as_arrays(image):
    """(RGB H×W×3, mode, alpha or None) of a path, binary file object, PIL image or uint8 array."""
    if isinstance(image, Image.Image):
        image.load()
        return image_arrays(image)
    if isinstance(image, np.ndarray):
        channels = 1 if image.ndim == 2 else image.shape[2] if image.ndim == 3 else 0
        mode = ARRAY_MODES.get(channels)
        if image.dtype != np.uint8 or mode is None:
            raise ValueError(f"an image array must be uint8 H×W, H×W×3 or H×W×4, not {image.dtype} {image.shape}")
        return image_arrays(Image.fromarray(image.reshape(image.shape[:2]) if channels == 1 else image, mode))
    if isinstance(image, (str, os.PathLike)) or hasattr(image, "read"):
        return read_image(image)[:3]
    raise TypeError(f"cannot compress a {type(image).__name__}: give a path, a file object, a PIL image or an array")


class Codec:
    """A loaded checkpoint: compresses with it, and decompresses any file whose checkpoint is in weights_dir."""

    def __init__(self, weights=None, device="cpu", weights_dir=WEIGHTS_DIR):
        self.weights = os.path.abspath(weights or DEFAULT_WEIGHTS)
        self.model, ckpt = load_checkpoint(self.weights, device)
        if not self.model.has_tables():
            raise ValueError(f"{weights}: checkpoint without entropy tables (save it with train.py)")
        self.model_id, self.kind = bytes.fromhex(ckpt["model_id"]), ckpt["kind"]
        self.device, self.weights_dir, self._models = device, weights_dir, {}

    def __reduce__(self):
        """Pickled as its checkpoint's path, not its weights: a worker process (multiprocessing, Dask, Ray) that
        receives a Codec loads the checkpoint once and reuses it for every later task."""
        return worker_codec, (self.weights, self.device, self.weights_dir)

    def compress(self, image, quality=None, effort=DEFAULT_EFFORT, coder="constriction", passphrase=None,
                 progress=None):
        """An image → the bytes of a .qae file (encrypted when a passphrase is given). effort 0 … 9: higher
        searches longer for a smaller file at the same quality (default 1, docs/effort.md); progress(done,
        total) follows the search."""
        rgb, mode, alpha = as_arrays(image)
        data = codec.compress(self.model, self.model_id, rgb, mode, alpha, quality, coder, effort, progress)
        return encrypt(data, passphrase) if passphrase else data

    def decompress(self, data, passphrase=None, max_pixels=codec.MAX_PIXELS):
        """A .qae file (bytes, a path or a file object) → a PIL image in the original size and mode; FormatError
        for a bad file or one declaring more than max_pixels (decoding needs memory in proportion to that size)."""
        data = self._opened(data, passphrase)
        model, model_id = self._model_for(codec.unpack(data, max_pixels)[0]["model_id"])
        return to_pil(*codec.decompress(model, model_id, data, max_pixels))

    def _opened(self, data, passphrase):
        """The file's plain bytes: decrypted when it is encrypted (a passphrase is then needed)."""
        data = file_bytes(data)
        if not is_encrypted(data):
            return data
        if passphrase is None:
            raise FormatError("the file is encrypted: pass passphrase=")
        try:
            return decrypt(data, passphrase)
        except DecryptionError as e:
            raise FormatError(str(e)) from None

    def _model_for(self, model_id):
        """(model, identity) that made a file: this codec's, or one found in weights_dir (loaded once)."""
        if model_id == self.model_id:
            return self.model, self.model_id
        if model_id not in self._models:
            try:
                path = find_checkpoint(model_id.hex(), self.weights_dir)
            except LookupError as e:
                raise FormatError(str(e).replace(" (pass --weights)", "")) from None
            self._models[model_id] = load_checkpoint(path, self.device)[0]
        return self._models[model_id], model_id


def info(data):
    """The header of a .qae file (bytes, a path or a file object) as a dict (model, size, mode, quality, coder,
    bytes, bpp, encrypted)."""
    return header_info(file_bytes(data))


_LOADED = {}  # (weights, device, weights_dir) → Codec, per process: what unpickled Codecs resolve to


def worker_codec(weights, device="cpu", weights_dir=WEIGHTS_DIR):
    """The Codec of a checkpoint, loaded once per process (what a pickled Codec becomes on a worker)."""
    key = (weights, device, weights_dir)
    if key not in _LOADED:
        _LOADED[key] = Codec(weights, device, weights_dir)
    return _LOADED[key]


_DEFAULT = []  # the default codec, loaded on first use


def default_codec():
    """The codec of the shipped default weights, loaded once per process."""
    if not _DEFAULT:
        _DEFAULT.append(Codec())
    return _DEFAULT[0]


def compress(image, quality=None, effort=DEFAULT_EFFORT, coder="constriction", passphrase=None):
    """An image → .qae bytes with the default model (see Codec.compress)."""
    return default_codec().compress(image, quality, effort, coder, passphrase)


def decompress(data, passphrase=None):
    """.qae bytes → PIL image, with whichever shipped model made them (see Codec.decompress)."""
    return default_codec().decompress(data, passphrase)
