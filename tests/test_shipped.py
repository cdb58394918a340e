"""The checkpoints shipped in weights/ load from the file alone and code an image sensibly."""
import glob
import os

import pytest

import metrics
from codec import compress, decompress
from conftest import ROOT, photo_like
from checkpoint import load_checkpoint

SHIPPED = sorted(p for p in glob.glob(os.path.join(ROOT, "weights", "*.pt")) if not p.endswith("_resume.pt"))


def test_weights_are_shipped():
    assert SHIPPED, "weights/ holds no checkpoint"


@pytest.mark.parametrize("path", SHIPPED, ids=os.path.basename)
def test_shipped_checkpoint_codes_an_image(path):
    """Tables present, identity recorded, and for rd models more bytes and more PSNR at higher quality."""
    model, ckpt = load_checkpoint(path)
    mid = bytes.fromhex(ckpt["model_id"])
    assert ckpt["step"] > 0 and ckpt.get("recipe")
    rgb = photo_like(96, 128, 7)
    qualities = model.ladder([1, 8])
    results = []
    for q in qualities:
        data = compress(model, mid, rgb, quality=q)
        results.append((len(data), metrics.psnr(rgb, decompress(model, mid, data)[0])))
    assert all(psnr > 18 for _, psnr in results)
    assert model.has_tables()
    if len(qualities) > 1:
        assert results[0][0] < results[1][0] and results[0][1] < results[1][1]
