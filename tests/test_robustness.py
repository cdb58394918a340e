"""Robustness: a fuzzed reader/decoder never crashes or allocates wildly, tiles match whole images,
kills leave either the old or the complete new file, training resumes after SIGKILL."""
import os
import signal
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import codec
import imagefiles
import imagestream
from codec import FormatError, compress, decompress
from conftest import ROOT, TINY_RD, photo_like
from checkpoint import load_checkpoint
from model import build_model

FUZZ_CASES = 3000


@pytest.fixture(scope="module", params=["rd", "hyper", "ctx"])
def rd(request):
    """A tiny rd model, hyperprior model and context model (every test using this runs on each)."""
    model, ckpt = load_checkpoint(request.getfixturevalue(f"{request.param}_ckpt"))
    return model, bytes.fromhex(ckpt["model_id"])


def refresh_crc(data):
    """Recompute the trailing CRC so a mutation reaches the payload decoders instead of the CRC check."""
    return data[:-4] + struct.pack(">I", zlib.crc32(data[:-4]))


@pytest.mark.parametrize("coder", codec.CODERS)
def test_fuzzed_files_fail_cleanly(rd, coder):
    """Seeded mutations (flips, truncations, insertions, header-field rewrites), CRC both kept and fixed."""
    model, mid = rd
    files = [compress(model, mid, photo_like(h, w, i), quality=q, coder=coder)
             for i, (h, w, q) in enumerate([(16, 16, 1), (40, 24, 8), (9, 70, 4.5)])]
    rng = np.random.default_rng(1234)
    outcomes = {"rejected": 0, "decoded": 0}
    for case in range(FUZZ_CASES // len(codec.CODERS)):
        data = bytearray(files[case % len(files)])
        kind = rng.integers(4)
        if kind == 0:
            for _ in range(rng.integers(1, 4)):
                data[rng.integers(len(data))] ^= 1 << rng.integers(8)
        elif kind == 1:
            data = data[: rng.integers(len(data))]
        elif kind == 2:
            pos = rng.integers(len(data))
            data = data[:pos] + bytes(rng.integers(0, 256, rng.integers(1, 9), dtype=np.uint8)) + data[pos:]
        else:  # rewrite a header field with a random value (dimensions, shape, lengths, quality)
            off = int(rng.choice([10, 12, 15, 17, 19, 21, 23, 27]))
            data[off : off + 2] = int(rng.integers(0, 65536)).to_bytes(2, "big")
        data = bytes(data)
        if rng.random() < 0.5 and len(data) > 4:
            data = refresh_crc(data)
        try:
            rgb, _, _ = decompress(model, mid, data)
            h, w = struct.unpack_from(">HH", data, 10)
            assert rgb.shape == (h, w, 3)  # a mutation that still decodes gives an image of the declared size
            outcomes["decoded"] += 1
        except FormatError:
            outcomes["rejected"] += 1
    assert outcomes["rejected"] > FUZZ_CASES // 4


def test_tiled_coding_equals_whole_image(rd, monkeypatch):
    model, _ = rd
    rgb = photo_like(300, 260)
    whole = codec.latents_of(model, rgb, 4)
    whole_img = codec.image_of(model, whole, 300, 260, 4)
    monkeypatch.setattr(codec, "TILE", 128)
    tiled = codec.latents_of(model, rgb, 4)
    assert whole.keys() == tiled.keys() and all(torch.equal(whole[k], tiled[k]) for k in whole)
    assert np.abs(codec.image_of(model, tiled, 300, 260, 4).astype(int) - whole_img).max() <= 1


def test_strip_images_keep_their_size(rd):
    model, mid = rd
    for h, w in ((1, 5000), (5000, 1)):
        assert decompress(model, mid, compress(model, mid, photo_like(h, w), quality=2))[0].shape == (h, w, 3)


def test_sigkill_during_compress_leaves_old_or_complete_file(rd_ckpt, tmp_path):
    src, dst = tmp_path / "big.png", tmp_path / "out.qae"
    Image.fromarray(photo_like(900, 1200)).save(src)
    dst.write_bytes(b"OLD")
    cmd = [sys.executable, os.path.join(ROOT, "test.py"), "compress", str(src), str(dst), "--weights", rd_ckpt]
    for delay in (0.5, 1.5, 3.0):
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.wait()
        data = dst.read_bytes()
        assert data == b"OLD" or codec.unpack(data)  # old file, or a complete one that parses (CRC ok)
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    assert codec.unpack(dst.read_bytes())


def test_training_resumes_after_sigkill(tmp_path):
    photos = tmp_path / "p"
    photos.mkdir()
    for i in range(6):
        Image.fromarray(photo_like(48, 48, i)).save(photos / f"{i}.png")
    out = tmp_path / "run"
    base = [sys.executable, os.path.join(ROOT, "train.py"), "--arch", "rd", "--rd-channels", "8,8", "--crop", "32",
            "--batch-size", "2", "--threads", "1", "--train-dir", str(photos), "--out", str(out),
            "--ckpt-minutes", "0.005", "--epochs", "100000", "--log-every", "1000"]
    p = subprocess.Popen(base, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    resume = out / "rd_resume.pt"
    deadline = time.time() + 120
    while time.time() < deadline and not (resume.exists() and load_checkpoint(str(resume))[1]["step"] >= 3):
        time.sleep(0.5)
    time.sleep(1.0)
    p.send_signal(signal.SIGKILL)
    p.wait()
    step = load_checkpoint(str(resume))[1]["step"]  # loads: never a half-written checkpoint
    assert step >= 3
    r = subprocess.run(base[:-6] + ["--max-steps", str(step + 2), "--resume"], capture_output=True, text=True)
    assert r.returncode == 0 and f"at step {step}" in r.stdout, r.stderr
    assert load_checkpoint(str(resume))[1]["step"] == step + 2


def test_wrong_checkpoint_kind_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.pt"
    torch.save({"something": torch.zeros(3)}, bad)
    with pytest.raises(ValueError, match="not a checkpoint"):
        load_checkpoint(str(bad))
    m = build_model(TINY_RD)
    state = {"kind": "rd", "config": {"kind": "rd", "N": 16, "M": 32}, "model": m.state_dict()}
    torch.save(state, bad)
    with pytest.raises(ValueError, match="do not fit"):
        load_checkpoint(str(bad))
    bad.write_bytes(b"garbage" * 10)
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        load_checkpoint(str(bad))


def with_payload(data, payload):
    """The file with another payload (its length field and CRC rewritten to match)."""
    n_payload, n_alpha = struct.unpack_from(">II", data, 23)
    head = bytearray(data[: codec.HEADER.size])
    struct.pack_into(">I", head, 23, len(payload))
    return refresh_crc(bytes(head) + payload + data[codec.HEADER.size + n_payload :])


@pytest.mark.parametrize("coder", codec.CODERS)
def test_damaged_payloads_are_refused(rd, coder):
    """A tile's coder stream extended or emptied, and with ANS (the default coder) one cut at either end — the
    tile table and the CRC kept consistent — is an error, not a picture; so is a payload whose tile table does
    not add up."""
    model, mid = rd
    data = compress(model, mid, photo_like(64, 96, 3), quality=5, coder=coder)
    payload = codec.unpack(data)[1]
    (stream,) = codec.split_tiles(payload, 1)
    damages = [stream + b"\x5a\xc3\x0f\x96", b""]
    if coder == "constriction":  # ANS ends exactly; the Python coder's stream has no end to check cuts against
        damages += [stream[:-4], stream[4:]]
    for damaged in [codec.join_tiles([d]) for d in damages] + [payload + b"\0\0\0\0", payload[4:], b""]:
        with pytest.raises(FormatError, match="payload corrupted"):
            decompress(model, mid, with_payload(data, damaged))
    assert decompress(model, mid, with_payload(data, codec.join_tiles([stream])))[0].shape == (64, 96, 3)


def test_tiles_are_coded_apart_and_decoded_seamlessly(rd, monkeypatch):
    """An image of 2 × 2 tiles: four streams, each decodable alone; the streamed decoder gives the whole-image
    synthesis of the stitched latents (tile edges get their neighbours' latents as context); a damaged second
    tile is an error."""
    model, mid = rd
    monkeypatch.setattr(codec, "TILE", 256)
    rgb = photo_like(300, 260, 4)
    data = compress(model, mid, rgb, quality=4)
    header, payload, _ = codec.unpack(data)
    assert header["tile"] == 256 // model.stride
    streams = codec.split_tiles(payload, 4)
    _, latents, _ = codec.read_latents(model, mid, data)
    assert latents["y"].shape == model.latent_shape(300, 260)
    assert np.array_equal(decompress(model, mid, data)[0], codec.image_of(model, latents, 300, 260, 4))
    assert codec.canonical_payload(model, mid, data) == payload  # what the fuzzer's oracle checks
    streams[1] = streams[1][:-4]
    with pytest.raises(FormatError, match="payload corrupted"):
        decompress(model, mid, with_payload(data, codec.join_tiles(streams)))


def test_decoding_holds_three_rows_of_tiles(rd, monkeypatch):
    """The decoder synthesizes each row of tiles as soon as the next one is decoded, never the whole image's
    latents at once; and reports its progress."""
    model, mid = rd
    monkeypatch.setattr(codec, "TILE", 256)
    data = compress(model, mid, photo_like(1000, 40, 5), quality=2)
    events, read_row = [], codec._row_y
    monkeypatch.setattr(codec, "_row_y", lambda *a, **k: events.append("decode") or read_row(*a, **k))
    steps = []
    decompress(model, mid, data, progress=lambda done, total: steps.append((done, total)) or events.append("step"))
    assert events == ["decode", "step", "decode", "step", "step", "decode", "step", "step", "decode", "step", "step",
                      "step"]  # a strip is synthesized once the next row of tiles is decoded
    assert steps == [(k, 8) for k in range(1, 9)]


def test_tile_sides_out_of_range_are_refused(rd):
    """A header's tile side outside 256 … 1024 pixels (work per tile, memory per tile) or not a multiple of 4 is
    a one-line error."""
    model, mid = rd
    data = bytearray(compress(model, mid, photo_like(40, 40), quality=2))
    for tile, message in ((4, "tiles of 64 pixels"), (128, "tiles of 2048 pixels"), (18, "impossible size"), (0, "impossible")):
        struct.pack_into(">H", data, 31, tile)
        with pytest.raises(FormatError, match=message):
            decompress(model, mid, refresh_crc(bytes(data)))


@pytest.mark.parametrize("coder", codec.CODERS)
def test_a_tiny_file_declaring_a_huge_image_is_refused_at_once(rd, coder, monkeypatch):
    """The decoding work is bounded by the payload: 8192² declared with an empty or 64-byte payload is refused
    before its symbols are decoded (it used to decode 50 M symbols of nothing: minutes and GBs)."""
    model, mid = rd
    data = bytearray(compress(model, mid, photo_like(16, 16), quality=1, coder=coder))
    struct.pack_into(">HH", data, 10, 8192, 8192)
    struct.pack_into(">HHH", data, 17, *model.latent_shape(8192, 8192))
    decoded = []
    take = codec.SymbolDecoder.take
    monkeypatch.setattr(codec.SymbolDecoder, "take", lambda self, freqs, n: decoded.append(n) or take(self, freqs, n))
    tiles = sum(map(len, codec.tile_grid(model.latent_shape(8192, 8192), codec.TILE // model.stride)))
    for payload in (b"", codec.join_tiles([b""] * tiles), codec.join_tiles([bytes(4)] * tiles)):
        with pytest.raises(FormatError, match="payload corrupted"):
            decompress(model, mid, with_payload(bytes(data), payload))
    # Symbols of tables near certainty cost ~1e-4 bits, so a few bytes may still pay for some; never for all.
    assert sum(decoded) < np.prod(model.latent_shape(8192, 8192)) // 10


def test_sigterm_while_writing_leaves_no_temporary_file(rd_ckpt, tmp_path):
    """kill (SIGTERM) unwinds like Ctrl-C: the output is old or complete and no .tmp- file stays beside it; a long
    output name (250 characters) is written too."""
    model, ckpt = load_checkpoint(rd_ckpt)
    rng = np.random.default_rng(0)
    noisy = rng.integers(0, 256, (1500, 2000, 3), dtype=np.uint8)  # a slow PNG to write: the kill lands in it
    src = tmp_path / "big.qae"
    src.write_bytes(compress(model, bytes.fromhex(ckpt["model_id"]), noisy, quality=8))
    out = tmp_path / ("o" * 246 + ".png")
    cmd = [sys.executable, os.path.join(ROOT, "test.py"), "decompress", str(src), str(out), "--weights", rd_ckpt]
    assert subprocess.run(cmd, capture_output=True).returncode == 0 and out.exists()
    for delay in (1.0, 2.0, 3.0):
        out.unlink(missing_ok=True)
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        p.send_signal(signal.SIGTERM)
        p.wait()
        assert [f.name for f in tmp_path.iterdir() if f.name.startswith(".tmp-")] == []
        assert not out.exists() or Image.open(out).size == (2000, 1500)


def test_malformed_checkpoints_are_one_line_errors_without_big_allocations(rd_ckpt, tmp_path):
    """A config of the wrong type or size, weights that are not its own, a stated identity that is not the weights'
    — each a ValueError before any model of the config's size is allocated (N = 200000 used to ask for 160 GB)."""
    good = torch.load(rd_ckpt, weights_only=True)
    bad = tmp_path / "bad.pt"
    cases = {"no kind": ({**good, "config": {k: v for k, v in good["config"].items() if k != "kind"}}, "unknown model kind"),
             "model a list": ({**good, "model": [1, 2]}, "wrong type"),
             "N a string": ({**good, "config": {**good["config"], "N": "abc"}}, "does not describe a model"),
             "N negative": ({**good, "config": {**good["config"], "N": -4}}, "does not describe a model"),
             "N huge": ({**good, "config": {**good["config"], "N": 200000}}, "do not fit the config"),
             "planted identity": ({**good, "model_id": "ad5274ea"}, "not that of its weights")}
    for name, (ckpt, message) in cases.items():
        torch.save(ckpt, bad)
        with pytest.raises(ValueError, match=message):
            load_checkpoint(str(bad))
    torch.save({"kind": "ctx", "config": {"kind": "ctx", "N": 2500}, "model": {}}, bad)  # a 1 KB file
    assert os.path.getsize(bad) < 2000
    with pytest.raises(ValueError, match="do not fit the config"):
        load_checkpoint(str(bad))


def test_encoding_holds_one_tile(rd, monkeypatch):
    """The encoder analyses, codes and drops one tile before the next: its latent-level memory is one tile's."""
    model, mid = rd
    monkeypatch.setattr(codec, "TILE", 256)
    events, analysed, write = [], codec._analysed, model.write_latents
    monkeypatch.setattr(codec, "_analysed", lambda *a: events.append("analyse") or analysed(*a))
    monkeypatch.setattr(model, "write_latents", lambda *a: events.append("write") or write(*a))
    compress(model, mid, photo_like(300, 520, 7), quality=3)
    assert events == ["analyse", "write"] * 6


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "LA"])
def test_large_images_stream_through_files_in_bands_of_rows(rd, mode, tmp_path, monkeypatch):
    """Above WHOLE_PIXELS an image file is read a band of rows at a time and written as PNG a strip at a time: the
    same .qae bytes and the same decoded pixels as the whole-image path, never more rows held than a band."""
    model, mid = rd
    monkeypatch.setattr(codec, "TILE", 256)
    rgb = photo_like(600, 300, 8)
    alpha = np.random.default_rng(8).integers(0, 256, rgb.shape[:2], dtype=np.uint8) if "A" in mode else None
    src = str(tmp_path / "in.png")
    imagefiles.write_image(src, rgb, mode, alpha)
    whole, _ = codec.compress_file(model, mid, src, str(tmp_path / "whole.qae"), quality=3, effort=1)
    codec.decompress_file(model, mid, whole, str(tmp_path / "whole.png"))
    held, get = [], imagestream.RowReader.__getitem__
    monkeypatch.setattr(imagestream.RowReader, "__getitem__", lambda r, i: held.append(len(r.rows)) or get(r, i))
    monkeypatch.setattr(codec, "decompress", None)  # the streamed path never assembles the image
    monkeypatch.setattr(imagestream, "WHOLE_PIXELS", 1000)
    monkeypatch.setattr(codec, "WHOLE_PIXELS", 1000)
    streamed, _ = codec.compress_file(model, mid, src, str(tmp_path / "streamed.qae"), quality=3, effort=1)
    assert streamed == whole and held and max(held) <= 256 + 2 * codec.HALO
    assert codec.decompress_file(model, mid, streamed, str(tmp_path / "streamed.png")) is None
    a, b = (imagefiles.read_image(str(tmp_path / f"{n}.png")) for n in ("whole", "streamed"))
    assert a[1] == b[1] == mode and np.array_equal(a[0], b[0])
    assert (a[2] is None and b[2] is None) or np.array_equal(a[2], b[2])


def test_images_a_reader_would_refuse_are_not_coded(rd, monkeypatch):
    """An image above the readers' default max_pixels is refused before any work, not written undecodable."""
    model, mid = rd
    monkeypatch.setattr(codec, "MAX_PIXELS", 1000)
    with pytest.raises(ValueError, match="at most 1,000 are coded"):
        compress(model, mid, photo_like(40, 30), quality=2)
    compress(model, mid, photo_like(40, 25), quality=2)


def test_a_streamed_image_is_read_upright(tmp_path, monkeypatch):
    """A large file with an EXIF orientation is turned upright as the whole-image path turns it."""
    monkeypatch.setattr(imagestream, "WHOLE_PIXELS", 100)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90° clockwise
    Image.fromarray(photo_like(40, 64, 9)).save(tmp_path / "o.png", exif=exif)
    reader, mode, alpha, _ = imagestream.open_image(str(tmp_path / "o.png"))
    whole = imagefiles.read_image(str(tmp_path / "o.png"))[0]
    assert isinstance(reader, imagestream.RowReader) and reader.shape == whole.shape == (64, 40, 3)
    assert np.array_equal(reader[0:40, :], whole[:40]) and np.array_equal(reader[30:64, 5:9], whole[30:, 5:9])
    assert np.array_equal(reader[35:40, :], whole[35:40])  # inside the band held
    with pytest.raises(ValueError, match="read once, top to bottom"):
        reader[10:20, :]


def test_streamed_alpha_must_hold_the_image_exactly(rd, tmp_path, monkeypatch):
    """A damaged alpha plane is refused while streaming too, and nothing is left at the output path."""
    model, mid = rd
    monkeypatch.setattr(codec, "WHOLE_PIXELS", 100)
    data = compress(model, mid, photo_like(40, 30, 2), "RGBA", np.full((40, 30), 7, np.uint8), quality=2)
    header, payload, packed = codec.unpack(data)
    for alpha in (zlib.compress(bytes(40 * 30 - 30)), zlib.compress(bytes(40 * 30 + 1)), packed[:-3], b"x" + packed):
        with pytest.raises(FormatError, match="alpha plane corrupted"):
            codec.decompress_file(model, mid, codec.pack(header, payload, alpha), str(tmp_path / "o.png"))
        assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("mode", ["L", "LA", "RGB", "RGBA"])
def test_png_rows_written_in_strips_read_back(mode, tmp_path):
    """write_png's strips of rows make a PNG any reader gives back exactly; a wrong row count is an error."""
    rng, c = np.random.default_rng(3), len(mode)
    image = rng.integers(0, 256, (37, 23, c), dtype=np.uint8)
    image[:20] //= 16  # smooth rows and noisy rows: every branch of the predictor
    with open(tmp_path / "o.png", "wb") as f:
        imagestream.write_png(f, 23, 37, mode, (image[r : r + 10] for r in range(0, 37, 10)))
    with Image.open(tmp_path / "o.png") as im:
        assert im.mode == mode and np.array_equal(np.asarray(im).reshape(37, 23, c), image)
    with pytest.raises(ValueError, match="36 rows written to a PNG of 37"):
        imagestream.write_png(open(tmp_path / "p.png", "wb"), 23, 37, mode, [image[:36]])
