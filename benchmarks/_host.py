"""The host a benchmark's figures were measured on: the CPU model and the flags that decide its
speed (the README asks for both beside every figure). Imported by the scripts in this folder."""

from __future__ import annotations

import platform
from pathlib import Path

FLAGS = ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu_model() -> str:
    """``model name`` of /proc/cpuinfo, else what the platform says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_flags() -> str:
    """Which of :data:`FLAGS` the CPU has, space-separated (``no avx512`` for none, ``flags unknown``)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "flags unknown"
    have = next((set(line.split(":", 1)[1].split()) for line in text.splitlines() if line.startswith("flags")), set())
    return " ".join(f for f in FLAGS if f in have) or "no avx512"
