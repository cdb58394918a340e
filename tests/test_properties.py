"""Property tests (hypothesis): any size, mode and quality round-trips to the input's size and mode and
decodes identically twice; any truncation or bit flip of a valid file is the one FormatError."""
import io

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import codec
from checkpoint import load_checkpoint
from imagefiles import read_image

MODES = ("L", "LA", "RGB", "RGBA", "P", "I;16", "CMYK")
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def tiny(rd_ckpt):
    """The tiny rd model and its identity."""
    model, ckpt = load_checkpoint(rd_ckpt)
    return model, bytes.fromhex(ckpt["model_id"])


def image_of(mode, h, w, seed):
    """A random image of a Pillow mode, as PNG / TIFF / JPEG bytes (whichever stores that mode)."""
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    im = rgb.convert("P") if mode == "P" else rgb.convert("I;16") if mode == "I;16" else rgb.convert(mode)
    out = io.BytesIO()
    im.save(out, format="JPEG" if mode == "CMYK" else "TIFF" if mode == "I;16" else "PNG")
    return out.getvalue()


@SETTINGS
@given(st.sampled_from(MODES), st.integers(1, 300), st.integers(1, 300), st.floats(1, 8), st.integers(0, 2**31))
def test_any_image_round_trips_to_its_size_and_mode(tiny, mode, h, w, quality, seed):
    model, mid = tiny
    rgb, kept, alpha, _ = read_image(io.BytesIO(image_of(mode, h, w, seed)))
    data = codec.compress(model, mid, rgb, kept, alpha, quality)
    out, out_mode, out_alpha = codec.decompress(model, mid, data)
    assert out.shape == (h, w, 3) and out_mode == kept
    assert (out_alpha is None) == (alpha is None) and (alpha is None or np.array_equal(out_alpha, alpha))
    assert np.array_equal(codec.decompress(model, mid, data)[0], out)


@SETTINGS
@given(st.data())
def test_truncations_and_bit_flips_are_the_one_error(tiny, data):
    model, mid = tiny
    valid = codec.compress(model, mid, np.full((20, 28, 3), 90, np.uint8), quality=3)
    if data.draw(st.booleans()):
        broken = valid[: data.draw(st.integers(0, len(valid) - 1))]
    else:
        bit = data.draw(st.integers(0, 8 * len(valid) - 1))
        broken = bytearray(valid)
        broken[bit // 8] ^= 1 << (bit % 8)
        broken = bytes(broken)
    with pytest.raises(codec.FormatError):
        codec.decompress(model, mid, broken)
