"""Whether a device computes in bfloat16 at full speed, and the autocast context for inference in it.

On a CPU, torch's bf16 autocast pays only with native bf16 instructions (``avx512_bf16`` or AMX); elsewhere oneDNN
emulates them and bf16 is slower than float32. Torch only (shipped to the Hub as remote code).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

__all__ = ["autocast", "bf16_supported", "check_bf16_supported"]

_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def _cpu_has_native_bf16() -> bool:
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if any(check is not None and check() for check in checks):
        return True
    try:  # older torch builds without the probes: the kernel's CPU flags
        words = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False
    return any(flag in words for flag in _CPU_FLAGS)


def bf16_supported(device: str | torch.device = "cpu") -> bool:
    """Whether `device` runs bfloat16 natively: a CPU with ``avx512_bf16`` / AMX, or a CUDA device with bf16."""
    device = torch.device(device)
    if device.type == "cpu":
        return _cpu_has_native_bf16()
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return False


def check_bf16_supported(device: str | torch.device = "cpu") -> None:
    """Raise a ``ValueError`` saying why when `device` lacks native bfloat16 (see :func:`bf16_supported`)."""
    device = torch.device(device)
    if bf16_supported(device):
        return
    if device.type == "cpu":
        raise ValueError(
            "bf16 on this CPU: it lacks native bfloat16 instructions (avx512_bf16 or amx_bf16 in `lscpu`), so torch "
            "would emulate them, slower than float32; use float32 (mixed precision 'no')"
        )
    raise ValueError(f"bf16 on {device}: the device does not support bfloat16; use float32")


def autocast(device: str | torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    """``torch.autocast(device, dtype=torch.bfloat16)`` when `bf16` (checked with :func:`check_bf16_supported`), else a
    no-op context. The model keeps float32 where bf16 would cost accuracy (sampling positions, the loss, the
    outputs)."""
    if not bf16:
        return contextlib.nullcontext()
    device = torch.device(device)
    check_bf16_supported(device)
    return torch.autocast(device.type, dtype=torch.bfloat16)
