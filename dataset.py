"""Random crops of photos for training (decoded once with imagefiles.read_rgb and kept in RAM; OpenCV resizing)."""
import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from imagefiles import read_rgb


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
        self.images = [img for img in (read_rgb(p, max_side) for p in paths) if min(img.shape[:2]) >= 16]
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
