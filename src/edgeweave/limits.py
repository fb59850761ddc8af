"""Bounds on what a command is asked to do, checked before any heavy work (loading a model,
starting processes), so that a bad value is a one-line error instead of a traceback minutes later.

Pure Python (no torch): the CLI's help texts quote these numbers.
"""

from __future__ import annotations

import math
from pathlib import Path

from edgeweave.errors import EdgeweaveError

# Input height and width: a feature map of 4096 x 4096 already holds 4 GB per 64 channels; a
# larger one is a typo, not an image (a model's own minimum is checked once it is loaded).
MIN_INPUT_SIZE, MAX_INPUT_SIZE = 1, 4096

# Memory of one local follower process (``edgeweave worker`` started by ``run --workers K``),
# measured on Linux x86-64, torch 2.x CPU: idle, 376 MiB of private (anonymous) memory, 695 MiB
# resident of which the rest is torch's shared libraries, counted once for all processes. A model
# is received into a file and mapped (checkpoint.py); what a follower adds of its own is its 4-D
# weights in the devices' layout, its share of the layers, a backend's copy of what it compiles
# and transient copies: 0.6-0.75x of VGG16's 528 MiB on five devices (ONNX Runtime, 224 px),
# so about the model's size, once.
FOLLOWER_IDLE_BYTES = 400 << 20
FOLLOWER_MODEL_COPIES = 1
# What the followers may take of the memory available: the rest stays for the leader's own work
# (the input, the outputs it gathers) and for everything else on the machine.
MEMORY_SHARE = 0.9


def check_input_size(n: int | None, flag: str = "--input-size") -> None:
    """``None`` (the model's default) passes; otherwise MIN_INPUT_SIZE..MAX_INPUT_SIZE."""
    if n is not None and not MIN_INPUT_SIZE <= n <= MAX_INPUT_SIZE:
        raise EdgeweaveError(f"{flag} must be {MIN_INPUT_SIZE}-{MAX_INPUT_SIZE} (pixels of height and width), got {n}")


def check_timeout(seconds: float, flag: str = "--timeout") -> None:
    if not (math.isfinite(seconds) and seconds > 0):
        raise EdgeweaveError(f"{flag} must be a positive number of seconds, got {seconds:g}")


def parse_address(addr: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) as a host and a port 1-65535, or a one-line error."""
    host, sep, port = addr.strip().rpartition(":")
    if not sep or not host.strip("[]"):
        raise EdgeweaveError(f"expected HOST:PORT (for example 127.0.0.1:29400), got {addr!r}")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise EdgeweaveError(f"invalid port {port!r} in {addr!r}: expected HOST:PORT with a port 1-65535")
    return host.strip("[]"), int(port)


def mem_available_bytes(meminfo: str | Path = "/proc/meminfo") -> int | None:
    """The kernel's estimate of memory available for new work (MemAvailable), or None where it
    cannot be read (not Linux)."""
    try:
        for line in Path(meminfo).read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def follower_bytes(model_bytes: int = 0) -> int:
    """Estimated memory of one local follower holding a model of ``model_bytes`` weights."""
    return FOLLOWER_IDLE_BYTES + FOLLOWER_MODEL_COPIES * int(model_bytes)


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.0f} MB"


def check_followers_fit(workers: int, model_bytes: int = 0, available: int | None = None) -> None:
    """Refuse ``workers`` local followers that the machine's memory cannot hold, saying how many fit."""
    if workers <= 0:
        return
    avail = mem_available_bytes() if available is None else available
    if avail is None:
        return
    each = follower_bytes(model_bytes)
    fit = int(avail * MEMORY_SHARE // each)
    if workers > fit:
        model = f" plus {FOLLOWER_MODEL_COPIES}x the model's {_gb(model_bytes)}" if model_bytes else ""
        raise EdgeweaveError(
            f"--workers {workers}: each local follower needs about {_gb(each)} ({_gb(FOLLOWER_IDLE_BYTES)} for the "
            f"process{model}) and {_gb(avail)} of memory is available ({100 - round(100 * MEMORY_SHARE)} % of it "
            f"kept for the leader and the rest of the machine), enough for {fit} "
            f"follower{'s' if fit != 1 else ''}; give --workers {fit} or less (or --cluster FILE for other machines)")
