"""Random crops of photos for training (decoded once with imagefiles.read_rgb and kept in RAM; OpenCV resizing),
and photo packs: a training set as one file, to carry to a machine that has no copy of it."""
import functools
import io
import os
from typing import NamedTuple

import cv2
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from imagefiles import list_images, read_rgb

PACK_SUFFIX = ".npz"


def pack_photos(paths, out, max_bytes, max_side=512, quality=90):
    """As many of the photos (in the given order) as fit max_bytes, each as JPEG bytes at its long side ≤ max_side
    (what CropDataset keeps anyway), into one .npz of two uint8 / int64 arrays; returns how many went in."""
    blobs, total = [], 0
    for path in paths:
        buf = io.BytesIO()
        Image.fromarray(read_rgb(path, max_side)).save(buf, "JPEG", quality=quality, subsampling=0)
        if total + buf.tell() > max_bytes:
            break
        blobs.append(np.frombuffer(buf.getvalue(), np.uint8))
        total += buf.tell()
    offsets = np.cumsum([0] + [len(b) for b in blobs]).astype(np.int64)
    np.savez(out, data=np.concatenate(blobs) if blobs else np.zeros(0, np.uint8), offsets=offsets)
    return len(blobs)


@functools.lru_cache(maxsize=4)
def _pack(path):
    """The (data, offsets) arrays of a photo pack, read once."""
    with np.load(path) as f:
        return f["data"], f["offsets"]


class PackedPhoto(NamedTuple):
    """One photo of a pack file (sortable and picklable like a path)."""

    pack: str
    index: int

    def read(self, max_side=None):
        """The photo as uint8 RGB (H, W, 3), long side ≤ max_side."""
        data, offsets = _pack(self.pack)
        return read_rgb(io.BytesIO(data[offsets[self.index] : offsets[self.index + 1]].tobytes()), max_side)


def photo_sources(where):
    """The photos of a folder (searched recursively) or of a pack file (PACK_SUFFIX); [] when there are none."""
    if os.path.isfile(where) and where.endswith(PACK_SUFFIX):
        return [PackedPhoto(where, i) for i in range(len(_pack(where)[1]) - 1)]
    return list_images(where) if os.path.isdir(where) else []


class CropDataset(Dataset):
    """Random crops of photos: random downscale (0.5–1, hides JPEG artefacts), crop, flip.

    Images are decoded once and kept in RAM (long side ≤ max_side) because decoding JPEGs would
    otherwise cost more CPU than a small model's training step. Items are asked for as
    (image index, seed): the crop is a pure function of both, so any process (a resumed run, a
    DataLoader worker, one rank of a distributed run) draws exactly the same crop for the same key.
    An integer key gives the deterministic centre crop (validation).
    """

    def __init__(self, paths, crop=128, max_side=512, min_scale=0.5):
        self.crop, self.min_scale = crop, min_scale
        read = lambda p: p.read(max_side) if isinstance(p, PackedPhoto) else read_rgb(p, max_side)  # noqa: E731
        self.images = [img for img in map(read, paths) if min(img.shape[:2]) >= 16]
        if not self.images:
            raise ValueError("no usable images (all unreadable or smaller than 16 px)")

    def __len__(self):
        return len(self.images)

    def full(self, i):
        """Photo i whole, as stored (long side ≤ max_side): float tensor (3, H, W) in [0, 1]."""
        # A copy: the stored arrays are read-only (Pillow's), and torch warns about wrapping one.
        return torch.from_numpy(np.array(self.images[i])).permute(2, 0, 1).float() / 255.0

    def _scaled(self, img, rng):
        """Random area downscale, never below the crop size; small images are upscaled to fit it."""
        h, w = img.shape[:2]
        lo = max(self.min_scale, self.crop / min(h, w)) if rng else 1.0
        s = rng.uniform(min(lo, 1.0), 1.0) if lo < 1.0 else lo
        if min(h, w) * s < self.crop:
            s = self.crop / min(h, w)
        if abs(s - 1.0) > 1e-3:
            interp = cv2.INTER_AREA if s < 1 else cv2.INTER_CUBIC
            img = cv2.resize(img, (max(self.crop, round(w * s)), max(self.crop, round(h * s))),
                             interpolation=interp)
        return img

    def __getitem__(self, key):
        """Crop for key = (index, seed) (random) or index (centre): uint8 tensor (3, crop, crop). Bytes, not floats:
        a quarter of the data for the loader's workers to hand over and for the copy to the device
        (on_device makes them floats there)."""
        i, seed = key if isinstance(key, (tuple, list)) else (key, None)
        rng = np.random.default_rng(seed) if seed is not None else None
        img = self._scaled(self.images[i], rng)
        h, w = img.shape[:2]
        if rng:
            y, x = rng.integers(0, h - self.crop + 1), rng.integers(0, w - self.crop + 1)
        else:
            y, x = (h - self.crop) // 2, (w - self.crop) // 2
        patch = img[y : y + self.crop, x : x + self.crop]
        if rng and rng.random() < 0.5:
            patch = patch[:, ::-1]
        return torch.from_numpy(np.ascontiguousarray(patch)).permute(2, 0, 1)


def on_device(batch, device):
    """A batch of uint8 crops (or already-float latents) → float32 on the device, crops scaled to [0, 1]."""
    batch = batch.to(device, non_blocking=True)
    return batch.float().div_(255.0) if batch.dtype == torch.uint8 else batch


def split_paths(paths, val_fraction, seed=0):
    """Deterministic train / validation split of a list of paths."""
    order = np.random.default_rng(seed).permutation(len(paths))
    n_val = int(round(len(paths) * val_fraction))
    val = sorted(paths[i] for i in order[:n_val])
    train = sorted(paths[i] for i in order[n_val:])
    return train, val


class LatentBank(Dataset):
    """Windows of the analysis output of whole photos, computed once (train.py --entropy-only).

    With the transforms frozen, the entropy model sees only the analysis output u = g_a(x): running g_a once
    per photo and training on windows of the stored u skips g_a and g_s at every step. Items are asked for
    as (photo index, seed), like CropDataset's, and give a random window of `window` latents a side (the
    whole u where it is smaller, replicate-padded); an integer key gives the centre window.
    """

    def __init__(self, photos, analyse, window, progress=None):
        self.window = window
        items = range(len(photos)) if progress is None else progress(range(len(photos)))
        with torch.no_grad():
            self.latents = [analyse(photos.full(i)[None])[0].half() for i in items]  # half: 2× the photos in RAM

    def __len__(self):
        return len(self.latents)

    def __getitem__(self, key):
        """Window for key = (index, seed) (random) or index (centre): float tensor (M, window, window)."""
        i, seed = key if isinstance(key, (tuple, list)) else (key, None)
        u = self.latents[i]
        pad_h, pad_w = max(0, self.window - u.shape[1]), max(0, self.window - u.shape[2])
        if pad_h or pad_w:
            u = torch.nn.functional.pad(u.float()[None], (0, pad_w, 0, pad_h), mode="replicate")[0]
        h, w = u.shape[1:]
        if seed is not None:
            rng = np.random.default_rng(seed)
            y, x = rng.integers(0, h - self.window + 1), rng.integers(0, w - self.window + 1)
        else:
            y, x = (h - self.window) // 2, (w - self.window) // 2
        return u[:, y : y + self.window, x : x + self.window].float()
