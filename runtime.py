"""What every script shares and that costs no start-up time: its help layout, the compute device, how freed
memory is kept (torch is imported only when a device is checked)."""
import argparse
import ctypes
import os


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The docstring as written, and every option's default (unless the help already says it, or it is unset)."""

    def _get_help_string(self, action):
        """The help text, with "(default: …)" added where it tells something."""
        if action.default in (None, False) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def wait_passively():
    """Let idle OpenMP threads sleep instead of spinning, unless the user chose a policy (OMP_WAIT_POLICY).

    Must run before torch is imported. On a machine whose cores are busy with other work, spinning threads
    wait on each other: measured on a 2-core x86-64 CPU with both cores busy, compressing a Kodak image
    took 2.57 s of coding with the default policy against 1.11 s passive (1.24 s with one thread).
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def keep_freed_memory():
    """Let glibc keep freed memory for the next tensor instead of unmapping it (Linux; else a no-op).

    By default each large block is a fresh mmap, so every big activation of a network pays a page
    fault per 4 KiB page on first touch: measured on a 2-core x86-64 CPU with ctx, Kodak images code
    14–18 % faster with it. Across many tiles what is kept fragments (test.py leaves images larger than
    one tile to glibc's default). Returns whether the setting took.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # mallopt parameter numbers from <malloc.h>
    mmap_ok = any(libc.mallopt(m_mmap_threshold, v) for v in (1 << 30, 1 << 25))  # glibcs differ in the max
    return bool(mmap_ok and libc.mallopt(m_trim_threshold, 1 << 30))


def hand_back_freed_memory():
    """Return the heap's free pages to the system now (glibc's malloc_trim; else a no-op). Between the tiles of a
    large image the heap holds freed blocks of many sizes, and the next tile's activations need fresh ones:
    trimming after each tile keeps the peak to about one tile's working set. Returns whether it ran."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return False
    return True


def resolve_device(name):
    """torch.device for a --device flag, or ValueError saying why it cannot be used here."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r}: not a device name (use cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"--device {name}: no CUDA device is available")
        if (device.index or 0) >= count:
            raise ValueError(f"--device {name}: there are only {count} CUDA device(s)")
    return device


def cpu_has_bf16():
    """Whether this CPU computes bf16 natively (AVX-512 BF16 or AMX) as oneDNN sees it.

    Without it PyTorch emulates bf16 convolutions: a ctx training step (4 crops of 256², 2 threads) took
    40.5 s in bf16 against 0.70 s in fp32 on a 2-core AMD EPYC with AVX2 only.
    """
    import torch

    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(check and torch.backends.mkldnn.is_available() and check())
