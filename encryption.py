"""Password protection of compressed files: scrypt key derivation + AES-256-GCM (authenticated).

Encrypted file layout (big-endian):

  offset size field (all in the clear, all authenticated as associated data)
  0      3    magic b"QAX"
  3      1    version (1)
  4      1    scrypt log2(N)
  5      1    scrypt r
  6      1    scrypt p
  7      16   random salt (fresh per file)
  23     12   random nonce (fresh per file)
  35     …    AES-256-GCM ciphertext of the whole inner .qae file, 16-byte tag last

Everything about the image (size, mode, model identity, quality, coder) is inside the ciphertext;
only the file's total length stays visible. Overhead: 35 + 16 = 51 bytes per file.
"""
import os
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

MAGIC = b"QAX"
VERSION = 1
CLEAR = struct.Struct(">3sBBBB16s12s")
TAG_BYTES = 16
OVERHEAD = CLEAR.size + TAG_BYTES
DEFAULT_LOG2_N, DEFAULT_R, DEFAULT_P = 15, 8, 1  # 32 MiB of memory, ~0.1 s on this CPU
MAX_LOG2_N, MAX_R, MAX_P = 20, 16, 4
# scrypt needs 128·r·N bytes and time in proportion to p·128·r·N: a file may ask for at most 8× the default's
# (256 MiB, under a second), or opening it would be a denial of service (N = 2^20, r = 16, p = 4 took 21.5 s
# and 2.8 GB on a 2-core x86-64 CPU).
MAX_COST = 1 << 28
ENV_VAR = "QAE_PASSPHRASE"


class DecryptionError(ValueError):
    """Wrong passphrase, or an encrypted file that was truncated or altered."""


def is_encrypted(data):
    """True when data starts like an encrypted file."""
    return data[:3] == MAGIC


def derive_key(passphrase, salt, log2_n, r, p):
    """32-byte key from a passphrase with scrypt (memory-hard)."""
    return Scrypt(salt=salt, length=32, n=1 << log2_n, r=r, p=p).derive(passphrase.encode("utf-8"))


def valid_parameters(log2_n, r, p):
    """True for scrypt parameters within the limits (MAX_COST), with N < 2^(16 r) (RFC 7914; OpenSSL refuses others)."""
    return (1 <= log2_n <= MAX_LOG2_N and 1 <= r <= MAX_R and 1 <= p <= MAX_P and log2_n < 16 * r
            and p * 128 * r << log2_n <= MAX_COST)


def encrypt(data, passphrase, log2_n=DEFAULT_LOG2_N, r=DEFAULT_R, p=DEFAULT_P):
    """Encrypt a compressed file's bytes with a fresh salt and nonce; returns the encrypted file."""
    if not passphrase:
        raise ValueError("empty passphrase")
    if not valid_parameters(log2_n, r, p):
        raise ValueError(f"scrypt parameters log2(N) = {log2_n}, r = {r}, p = {p} out of range")
    salt, nonce = os.urandom(16), os.urandom(12)
    clear = CLEAR.pack(MAGIC, VERSION, log2_n, r, p, salt, nonce)
    return clear + AESGCM(derive_key(passphrase, salt, log2_n, r, p)).encrypt(nonce, data, clear)


def decrypt(data, passphrase):
    """Inverse of encrypt; DecryptionError for a wrong passphrase or any altered / truncated byte."""
    if len(data) < OVERHEAD or not is_encrypted(data):
        raise DecryptionError("not an encrypted QAE file, or truncated")
    _, version, log2_n, r, p, salt, nonce = CLEAR.unpack_from(data)
    if version != VERSION:
        raise DecryptionError(f"encryption version {version} is not supported")
    if not valid_parameters(log2_n, r, p):
        raise DecryptionError("encrypted file corrupted (key-derivation parameters out of range)")
    clear = data[: CLEAR.size]
    try:
        return AESGCM(derive_key(passphrase, salt, log2_n, r, p)).decrypt(nonce, data[CLEAR.size :], clear)
    except MemoryError:  # OpenSSL refusing the parameters (cryptography reports it as a MemoryError)
        raise DecryptionError("encrypted file corrupted (key-derivation parameters refused)") from None
    except InvalidTag:
        raise DecryptionError("wrong passphrase, or the encrypted file was altered or truncated") from None


def read_passphrase(key_file=None, confirm=False):
    """Passphrase from --key-file, else $QAE_PASSPHRASE, else typed at the terminal (twice to confirm)."""
    import getpass
    import sys

    if key_file:
        with open(key_file, "rb") as f:
            secret = f.read().decode("utf-8").rstrip("\r\n")
        if not secret:
            raise ValueError(f"key file {key_file} is empty")
        return secret
    if os.environ.get(ENV_VAR):
        return os.environ[ENV_VAR]
    if not sys.stdin.isatty():
        raise ValueError(f"a passphrase is needed: use --key-file FILE or set {ENV_VAR} (no terminal to ask on)")
    secret = getpass.getpass("passphrase: ")
    if confirm and getpass.getpass("passphrase again: ") != secret:
        raise ValueError("the two passphrases differ")
    if not secret:
        raise ValueError("empty passphrase")
    return secret
