"""Device and numeric-precision selection."""

from __future__ import annotations

import contextlib

import torch

from .errors import CharnnError, setting

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` prefers CUDA, then Apple's MPS, then the CPU."""
    asked = (name or "auto").strip()
    name = asked.lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise CharnnError(f"unknown device {asked!r}; use auto, cpu, cuda, cuda:N or mps") from e
    fallback = f"use {setting('device', 'cpu')} or {setting('device', 'auto')}"
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CharnnError(f"{setting('device', asked)} was asked for but CUDA is not available; {fallback}")
    if device.type == "cuda" and device.index is not None and device.index >= (count := torch.cuda.device_count()):
        have = "one CUDA device, cuda:0" if count == 1 else f"{count} CUDA devices, cuda:0 to cuda:{count - 1}"
        raise CharnnError(f"{setting('device', asked)} was asked for but this machine has {have}; use one of those, or cuda")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise CharnnError(f"{setting('device', asked)} was asked for but MPS is not available; {fallback}")
    return device


def cpu_has_fast_bf16() -> bool:
    """True where oneDNN runs bf16 natively (AVX-512 BF16 or AMX), so bf16 is faster, not emulated."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def pick_precision(precision: str, device: torch.device) -> str:
    """Resolve ``auto``: bf16 on CUDA cards that support it and on CPUs with native bf16, else fp32."""
    precision = (precision or "auto").lower()
    if precision not in PRECISIONS:
        raise CharnnError(f"{setting('precision')} must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if device.type == "cpu" and cpu_has_fast_bf16() else "fp32"
    if precision == "fp16" and device.type == "cpu":
        raise CharnnError(f"{setting('precision', 'fp16')} needs a GPU; use bf16 or fp32 on the CPU")
    return precision


def autocast(device: torch.device, precision: str):
    """Autocast context for mixed precision (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)
