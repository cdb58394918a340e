"""Password-protected files: round trip, wrong key, tampering, fresh randomness, nothing revealed."""
import os
import struct
import subprocess
import sys

import pytest
from PIL import Image

from codec import compress, decompress
from conftest import ROOT, photo_like
from encryption import CLEAR, OVERHEAD, DecryptionError, decrypt, encrypt
from checkpoint import load_checkpoint

FAST = dict(log2_n=4, r=1, p=1)  # weak KDF settings, only to keep the byte-flip loop fast


@pytest.fixture(scope="module")
def small_file(rd_ckpt):
    model, ckpt = load_checkpoint(rd_ckpt)
    mid = bytes.fromhex(ckpt["model_id"])
    return model, mid, compress(model, mid, photo_like(20, 24), quality=1)


def test_round_trip_and_overhead(small_file):
    model, mid, data = small_file
    enc = encrypt(data, "correct horse")
    assert len(enc) == len(data) + OVERHEAD
    assert decrypt(enc, "correct horse") == data
    assert decompress(model, mid, decrypt(enc, "correct horse"))[0].shape == (20, 24, 3)


def test_wrong_passphrase(small_file):
    with pytest.raises(DecryptionError, match="wrong passphrase"):
        decrypt(encrypt(small_file[2], "right", **FAST), "wrong")


def test_every_byte_flip_and_truncation_is_rejected(small_file):
    enc = encrypt(small_file[2], "k", **FAST)
    for i in range(len(enc)):
        bad = bytearray(enc)
        bad[i] ^= 0x01
        with pytest.raises(DecryptionError):
            decrypt(bytes(bad), "k")
    for n in (0, 3, CLEAR.size, len(enc) - 1):
        with pytest.raises(DecryptionError):
            decrypt(enc[:n], "k")


def test_two_encryptions_differ(small_file):
    a, b = encrypt(small_file[2], "k", **FAST), encrypt(small_file[2], "k", **FAST)
    assert a != b and a[7:35] != b[7:35]  # fresh salt and nonce


def test_clear_part_reveals_no_dimensions(rd_ckpt):
    model, ckpt = load_checkpoint(rd_ckpt)
    mid = bytes.fromhex(ckpt["model_id"])
    clears = []
    for h, w in ((37, 91), (64, 64)):
        enc = encrypt(compress(model, mid, photo_like(h, w), quality=2), "k", **FAST)
        clear = enc[: CLEAR.size]
        assert struct.pack(">HH", h, w) not in enc and mid not in enc
        clears.append(clear[:7])
    assert clears[0] == clears[1]  # the clear header is the same for any image


def test_cli_encrypt_decrypt(rd_ckpt, tmp_path):
    src, out, back = tmp_path / "a.png", tmp_path / "a.qae", tmp_path / "b.png"
    Image.fromarray(photo_like(30, 40)).save(src)
    key = tmp_path / "key.txt"
    key.write_text("s3cret\n")
    run = lambda *a, **kw: subprocess.run([sys.executable, os.path.join(ROOT, "test.py"), *a], capture_output=True,
                                           text=True, timeout=120, **kw)
    r = run("compress", str(src), str(out), "--weights", rd_ckpt, "--encrypt", "--key-file", str(key))
    assert r.returncode == 0, r.stderr
    r = run("decompress", str(out), str(back), "--weights-dir", os.path.dirname(rd_ckpt), "--key-file", str(key))
    assert r.returncode == 0 and Image.open(back).size == (40, 30), r.stderr
    r = run("decompress", str(out), str(tmp_path / "c.png"), "--weights", rd_ckpt,
            env={**os.environ, "QAE_PASSPHRASE": "nope"})
    assert r.returncode == 1 and "wrong passphrase" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "c.png").exists()


def test_costly_key_derivation_parameters_are_refused_before_deriving(small_file):
    """A file asking scrypt for more than MAX_COST (N = 2^20, r = 16, p = 4: 2 GiB and seconds) is refused at once;
    encrypt refuses to write one."""
    enc = bytearray(encrypt(small_file[2], "k", **FAST))
    enc[4:7] = bytes([20, 16, 4])
    with pytest.raises(DecryptionError, match="out of range"):
        decrypt(bytes(enc), "k")
    with pytest.raises(ValueError, match="out of range"):
        encrypt(small_file[2], "k", log2_n=18, r=16, p=1)
    assert decrypt(encrypt(small_file[2], "k"), "k") == small_file[2]  # the defaults stay well inside
