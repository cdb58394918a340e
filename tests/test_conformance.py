"""Conformance corpus: every committed .qae file decodes to the recorded pixels and latents, and every
file of the current format version is re-encoded from its source image to the same bytes."""
import hashlib
import json
import os
import sys

import numpy as np
import pytest

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "tools"))

import codec
from checkpoint import load_checkpoint
from imagefiles import read_image
from make_conformance import latent_digest  # noqa: E402

CORPUS = os.path.join(ROOT, "tests", "conformance")
with open(os.path.join(CORPUS, "manifest.json")) as f:
    ENTRIES = json.load(f)
MODELS = {}


def shipped(weights):
    """(model, identity) of a shipped checkpoint, loaded once."""
    if weights not in MODELS:
        model, ckpt = load_checkpoint(os.path.join(ROOT, "weights", weights))
        MODELS[weights] = model, bytes.fromhex(ckpt["model_id"])
    return MODELS[weights]


def sha(data):
    """Hex SHA-256 of bytes."""
    return hashlib.sha256(data).hexdigest()


def test_corpus_covers_every_model_coder_mode_and_version():
    """The corpus holds each shipped model, both coders, every mode, each format version still read and files of
    several tiles."""
    assert {e["weights"] for e in ENTRIES} == {f for f in os.listdir(os.path.join(ROOT, "weights")) if f.endswith(".pt")}
    assert {e["coder"] for e in ENTRIES} == set(codec.CODERS)
    assert {e["version"] for e in ENTRIES} == {3, 4, codec.VERSION}
    tiles = [codec.unpack(open(os.path.join(CORPUS, e["file"]), "rb").read())[0]["tile"] for e in ENTRIES]
    widths = [codec.unpack(open(os.path.join(CORPUS, e["file"]), "rb").read())[0]["width"] for e in ENTRIES]
    assert any(t and w > t * 16 for t, w in zip(tiles, widths))
    modes = {codec.unpack(open(os.path.join(CORPUS, e["file"]), "rb").read())[0]["mode"] for e in ENTRIES}
    assert modes == {"RGB", "L", "RGBA"}


@pytest.mark.parametrize("entry", ENTRIES, ids=[e["file"] for e in ENTRIES])
def test_file_decodes_to_the_recorded_image(entry):
    """Decoded latents (exact on every machine) match the manifest, and decoded pixels the stored image: the same
    bytes, or (another CPU or thread count) within one level."""
    model, mid = shipped(entry["weights"])
    with open(os.path.join(CORPUS, entry["file"]), "rb") as f:
        data = f.read()
    assert sha(data) == entry["sha256_file"]
    assert latent_digest(codec.read_latents(model, mid, data)[1]) == entry["sha256_latents"]
    rgb, mode, alpha = codec.decompress(model, mid, data)
    digest = sha(mode.encode() + np.ascontiguousarray(rgb).tobytes() + (b"" if alpha is None else alpha.tobytes()))
    if digest != entry["sha256_image"]:  # float synthesis: another CPU or thread count may round a pixel the other way
        ref_rgb, ref_mode, ref_alpha, _ = read_image(os.path.join(CORPUS, "decoded", entry["file"] + ".png"))
        assert mode == ref_mode and np.abs(rgb.astype(int) - ref_rgb).max() <= 1
        assert (alpha is None) == (ref_alpha is None) and (alpha is None or np.array_equal(alpha, ref_alpha))


@pytest.mark.parametrize("entry", [e for e in ENTRIES if e["version"] == codec.VERSION],
                         ids=[e["file"] for e in ENTRIES if e["version"] == codec.VERSION])
def test_source_reencodes_to_the_same_bytes(entry):
    """Compressing the source image again gives the committed file byte for byte."""
    model, mid = shipped(entry["weights"])
    rgb, mode, alpha, _ = read_image(os.path.join(CORPUS, entry["source"]))
    assert sha(codec.compress(model, mid, rgb, mode, alpha, entry["quality"], entry["coder"])) == entry["sha256_file"]


def test_missing_mode_adds_a_lost_entry_and_keeps_the_rest(tmp_path):
    """make_conformance --missing re-creates an entry the manifest lacks, byte for byte, and leaves every recorded
    entry and file as it was (a new model's files join without re-coding the old ones on another CPU)."""
    import shutil

    import make_conformance

    shutil.copytree(CORPUS, tmp_path, dirs_exist_ok=True)
    lost = next(e for e in ENTRIES if e["weights"] == "rd.pt" and e["version"] == codec.VERSION)
    kept = [e for e in ENTRIES if e is not lost]
    (tmp_path / "manifest.json").write_text(json.dumps(kept))
    os.remove(tmp_path / lost["file"])
    marker = tmp_path / ENTRIES[0]["file"]
    marker.write_bytes(b"left alone")  # a recorded file is not rewritten
    make_conformance.main(["--out", str(tmp_path), "--missing"])
    redone = json.loads((tmp_path / "manifest.json").read_text())
    assert redone[: len(kept)] == kept and len(redone) == len(ENTRIES)
    assert redone[-1]["sha256_file"] == lost["sha256_file"] == sha((tmp_path / lost["file"]).read_bytes())
    assert redone[-1]["sha256_latents"] == lost["sha256_latents"] and marker.read_bytes() == b"left alone"
