"""Entropy coders, the file format and image round trips, including every bad-file error."""
import struct
import zlib

import numpy as np
import pytest
import torch

import codec
from checkpoint import load_checkpoint
from codec import (CODERS, HEADER_BYTES, RANGE_CODER, FormatError, SymbolDecoder, compress, decompress, encoder_of,
                   entropy_decode, entropy_encode, latents_of, pack, read_latents, unpack)
from conftest import TINY_RD, photo_like
from intnet import SPARSE_LEVELS
from model import build_model
from quantize import escape_segments, read_escapes
import metrics


def payload_round_trip(model, latents, quality, coder):
    """Latents → the model's payload → latents, with one entropy coder."""
    payload = model.write_latents(latents, quality, encoder_of(coder))
    return model.read_latents(payload, tuple(latents["y"].shape), quality, lambda data: SymbolDecoder(data, coder))


@pytest.fixture(scope="module", params=["rd", "hyper", "ctx"])
def rd(request):
    """A tiny rd model, hyperprior model and context model (every test using this runs on each)."""
    model, ckpt = load_checkpoint(request.getfixturevalue(f"{request.param}_ckpt"))
    return model, bytes.fromhex(ckpt["model_id"])


@pytest.fixture(scope="module")
def seed(seed_ckpt):
    model, ckpt = load_checkpoint(seed_ckpt)
    return model, bytes.fromhex(ckpt["model_id"])


@pytest.mark.parametrize("coder", CODERS)
def test_entropy_round_trip(coder):
    rng = np.random.default_rng(0)
    tables = [np.array([60000, 5000, 536]), np.array([1 << 16]), np.full(64, 1024)]
    segments = [(rng.choice(3, 3000, p=t / t.sum()), t) for t in tables[:1]]
    segments += [(np.zeros(10, np.int64), tables[1]), (rng.integers(0, 64, 500), tables[2])]
    data = entropy_encode(segments, coder)
    out = entropy_decode(data, [t for _, t in segments], [len(s) for s, _ in segments], coder)
    for (s, _), o in zip(segments, out):
        assert np.array_equal(s, o)
    ideal = sum(-np.log2(t[s] / t.sum()).sum() for s, t in segments)
    assert len(data) * 8 <= ideal * 1.02 + 64


def header(**kw):
    h = {"kind": "rd", "coder": "constriction", "model_id": b"abcd", "height": 5, "width": 7, "mode": "RGB",
         "param": 400, "latent_shape": (24, 1, 1), "tile": 64}
    h.update(kw)
    return h


def test_pack_unpack_round_trip():
    data = pack(header(), b"payload!", b"al")
    h, payload, alpha = unpack(data)
    assert h == {**header(), "version": codec.VERSION} and payload == b"payload!" and alpha == b"al"
    assert len(data) == HEADER_BYTES + 10


def test_every_truncation_and_flip_is_rejected():
    data = pack(header(), bytes(range(40)))
    for n in range(len(data)):
        with pytest.raises(FormatError):
            unpack(data[:n])
    for i in range(len(data)):
        bad = bytearray(data)
        bad[i] ^= 0x10
        with pytest.raises(FormatError):
            unpack(bytes(bad))


@pytest.mark.parametrize("data, message", [
    (b"", "magic"), (b"\x89PNG\r\n\x1a\n" + bytes(64), "magic"),
    (pack(header(), b"x")[:3] + b"\x09" + pack(header(), b"x")[4:], "version"),
])
def test_foreign_files_are_rejected(data, message):
    with pytest.raises(FormatError, match=message):
        unpack(data)


def test_absurd_dimensions_are_rejected_before_allocating():
    body = pack(header(height=65535, width=65535), b"")[:-4]
    with pytest.raises(FormatError, match="more than the 268,435,456"):
        unpack(body + struct.pack(">I", zlib.crc32(body)))


def test_a_reader_can_cap_the_declared_size(rd):
    """decompress(max_pixels=) refuses larger declared sizes before decoding; the default reads them."""
    model, mid = rd
    data = compress(model, mid, photo_like(40, 50), quality=3)
    with pytest.raises(FormatError, match="more than the 1,999"):
        decompress(model, mid, data, max_pixels=1999)
    assert decompress(model, mid, data, max_pixels=2000)[0].shape == (40, 50, 3)


@pytest.mark.parametrize("shape", [(1, 1), (33, 47), (16, 16), (5, 130)])
@pytest.mark.parametrize("kind", ["rd", "seed"])
def test_image_round_trip_any_size(kind, shape, rd, seed):
    model, mid = rd if kind == "rd" else seed
    rgb = photo_like(*shape)
    data = compress(model, mid, rgb, quality=3 if kind == "rd" else None)
    out, mode, alpha = decompress(model, mid, data)
    assert out.shape == rgb.shape and out.dtype == np.uint8 and mode == "RGB" and alpha is None


def test_alpha_is_lossless_and_modes_are_kept(rd):
    model, mid = rd
    rgb, a = photo_like(20, 30), photo_like(20, 30, 1)[..., 0]
    for mode in ("RGBA", "LA"):
        out, m, alpha = decompress(model, mid, compress(model, mid, rgb, mode, a, quality=2))
        assert m == mode and np.array_equal(alpha, a)


def test_both_coders_decode_to_the_same_image(rd, seed):
    rgb = photo_like(40, 56)
    for model, mid in (rd, seed):
        outs = [decompress(model, mid, compress(model, mid, rgb, quality=5 if model.cfg.kind == "rd" else None,
                                                coder=c))[0] for c in CODERS]
        assert np.array_equal(outs[0], outs[1])


def test_wrong_model_is_a_clear_error(rd, seed):
    data = compress(*rd, photo_like(16, 16), quality=2)
    with pytest.raises(FormatError, match="made by model"):
        decompress(*seed, data)
    with pytest.raises(FormatError, match="made by model"):
        decompress(rd[0], b"zzzz", data)


def test_file_bits_match_estimated_bits(rd):
    """The payload is within 1 % of the model's estimate, plus the coder's fixed cost (flushing, the sparse and
    escape headers of each coded group: ~20 bits per slice of the ctx model, which a 700-byte file notices)."""
    model, mid = rd
    rgb = photo_like(256, 384)
    y = latents_of(model, rgb, 4)
    data = compress(model, mid, rgb, quality=4)
    payload_bits = 8 * (len(data) - HEADER_BYTES)
    estimate = model.estimated_bits(y, 4)
    assert abs(payload_bits - estimate) < 0.01 * estimate + 32 * len(getattr(model, "bounds", [0]))


def test_quality_out_of_range(rd):
    with pytest.raises(ValueError, match="outside"):
        compress(*rd, photo_like(8, 8), quality=9)


def test_decoding_is_identical_with_1_and_2_threads(rd):
    """Symbols come from integer tables only: identical whatever the thread count; pixels within ±1."""
    model, mid = rd
    data = compress(model, mid, photo_like(96, 128, 3), quality=6)
    before = torch.get_num_threads()
    try:
        decoded = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            decoded.append((read_latents(model, mid, data)[1], decompress(model, mid, data)[0]))
    finally:
        torch.set_num_threads(before)
    assert decoded[0][0].keys() == decoded[1][0].keys()
    assert all(torch.equal(decoded[0][0][k], decoded[1][0][k]) for k in decoded[0][0])
    assert np.abs(decoded[0][1].astype(int) - decoded[1][1].astype(int)).max() <= 1


def test_quality_knob_is_monotone():
    """Higher quality → more bytes and higher PSNR (a tiny model started as a Haar wavelet codec)."""
    torch.manual_seed(0)
    model = build_model(TINY_RD)
    crops = torch.stack([torch.from_numpy(photo_like(64, 64, i)).permute(2, 0, 1).float() / 255 for i in range(8)])
    model.init_transforms(crops)
    model.eval().build_tables()
    rgb = photo_like(128, 128, 9)
    sizes, psnrs = [], []
    for q in (1, 2.5, 4, 5.5, 7, 8):
        data = compress(model, b"test", rgb, quality=q)
        sizes.append(len(data))
        psnrs.append(metrics.psnr(rgb, decompress(model, b"test", data)[0]))
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes)
    assert psnrs == sorted(psnrs)


@pytest.mark.parametrize("coder", CODERS)
def test_escaped_values_round_trip(coder):
    """Exp-Golomb escapes: any signed value, none, or many, decode exactly after other segments."""
    rng = np.random.default_rng(5)
    for values in (np.array([], np.int64), np.array([0, -1, 1, 2**29, -(2**29)]), rng.integers(-5000, 5000, 300)):
        head = (rng.integers(0, 3, 50), np.array([30000, 30000, 5536]))
        data = entropy_encode([head] + escape_segments(values), coder)
        dec = SymbolDecoder(data, coder)
        assert np.array_equal(dec.take(head[1], 50), head[0])
        assert np.array_equal(read_escapes(dec, len(values)), values)


@pytest.mark.parametrize("quality", [1, 3.3, 8])
def test_latents_outside_the_tables_are_not_clamped(rd, quality):
    """Values far beyond a table's range travel as escapes and come back (no clamping): exactly, or for the ctx
    model, whose latents are μ + a whole number of steps, to within half a step of the mean the edits moved;
    and a decoded file codes back to itself exactly."""
    model, _ = rd
    latents = latents_of(model, photo_like(64, 96, 4), quality)
    edits = ((0, 0, 0), (1, 0, 1), (-1, -1, -1))
    for v in latents.values():
        for where, value in zip(edits, (3000, -4000, 1e6)):
            v[where] = value
    for coder in CODERS:
        decoded = payload_round_trip(model, latents, quality, coder)
        assert decoded.keys() == latents.keys()
        exact = [k for k in latents if k != "y" or model.cfg.kind != "ctx"]
        assert all(torch.equal(decoded[k], latents[k]) for k in exact)
        for where in edits:
            assert abs(float(decoded["y"][where]) - float(latents["y"][where])) <= (0.5 if model.cfg.kind == "ctx" else 0)
        again = payload_round_trip(model, decoded, quality, coder)
        assert all(torch.equal(again[k], decoded[k]) for k in decoded)


def test_sparse_smallest_scale_latents_round_trip(hyper_ckpt):
    """Latents at the smallest scale are coded as their nonzeros' positions and values: none, a few,
    or all of them nonzero come back exactly, with both coders."""
    model, _ = load_checkpoint(hyper_ckpt)
    with torch.no_grad():
        model.h_s[-1].bias.fill_(-20.0)  # every predicted scale at the floor: every latent is sparse-coded
    model.build_tables()
    latents = latents_of(model, photo_like(48, 80, 6), 2.0)
    index = model.scale_index(latents["z"][None], 2.0, latents["y"].shape[1:])[0]
    assert bool((index < SPARSE_LEVELS).all())
    rng = np.random.default_rng(0)
    for n_nonzero in (0, 3, latents["y"].numel()):
        y = torch.zeros_like(latents["y"]).view(-1)
        y[torch.from_numpy(rng.permutation(y.numel())[:n_nonzero])] = torch.from_numpy(rng.integers(-9, 10, n_nonzero)).float()
        lat = {"y": y.view(latents["y"].shape), "z": latents["z"]}
        for coder in CODERS:
            decoded = payload_round_trip(model, lat, 2.0, coder)
            assert all(torch.equal(decoded[k], lat[k]) for k in lat)


def test_hyper_files_of_format_2_are_refused(hyper_ckpt):
    """Version 3 changed the hyper payload: a version-2 hyper file is a clear error, not a garbage image."""
    model, ckpt = load_checkpoint(hyper_ckpt)
    data = compress(model, bytes.fromhex(ckpt["model_id"]), photo_like(32, 32, 1), quality=3)
    body = data[:3] + b"\x02" + data[4:-4]
    with pytest.raises(FormatError, match="version 2"):
        unpack(body + struct.pack(">I", zlib.crc32(body)))


@pytest.mark.parametrize("ckpt", ["rd_ckpt", "hyper_ckpt"])
def test_range_coded_files_of_format_3_still_decode(ckpt, request):
    """Version 4 moved "constriction" from its range coder to ANS: a version-3 file (range coder) decodes
    to the same image as the version-4 file of the same latents."""
    model, ckpt_dict = load_checkpoint(request.getfixturevalue(ckpt))
    mid, rgb = bytes.fromhex(ckpt_dict["model_id"]), photo_like(40, 56, 2)
    data = compress(model, mid, rgb, quality=3)
    header, _, _ = unpack(data)
    legacy = pack(header, model.write_latents(latents_of(model, rgb, 3), 3, lambda segs: entropy_encode(segs, RANGE_CODER)),
                  version=3)
    assert unpack(legacy)[0]["coder"] == RANGE_CODER and legacy != data
    assert np.array_equal(decompress(model, mid, legacy)[0], decompress(model, mid, data)[0])


def test_single_table_checkpoint_loads_without_tables(rd_ckpt, tmp_path):
    """A checkpoint of the old layout (one table for all qualities) loads; its tables must be rebuilt."""
    ckpt = torch.load(rd_ckpt, weights_only=True)
    ckpt["model"] = {k: v for k, v in ckpt["model"].items() if not k.startswith("prior.") or k.count(".") > 1}
    ckpt["model"].update({"prior.freqs": torch.ones(24, 5, dtype=torch.int32),
                          "prior.offsets": torch.zeros(24, dtype=torch.int32),
                          "prior.lengths": torch.full((24,), 5, dtype=torch.int32)})
    del ckpt["model_id"]  # the identity was the other tensors': the loader computes this file's own
    path = str(tmp_path / "old.pt")
    torch.save(ckpt, path)
    model, _ = load_checkpoint(path)
    assert not model.prior.has_tables()
    model.build_tables()
    assert model.prior.has_tables() and model.prior.starts.shape == (29, 24)
