"""The host machine as fxquant sees it: the one reader of ``/proc/cpuinfo``.

Used by the quantize op's build key, the CPU backend's feature detection and every benchmark's
machine record, so all of them agree on what the CPU is.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_CPUINFO = Path("/proc/cpuinfo")


@dataclass(frozen=True)
class CpuInfo:
    """What the host CPU is and which of the flags that matter here it has."""

    model: str
    flags: frozenset[str]
    cores: int

    @property
    def has_avx2(self) -> bool:
        return {"avx2", "fma"} <= self.flags

    @property
    def has_vnni(self) -> bool:
        return {"avx512_vnni", "avx512bw", "avx512f"} <= self.flags

    def to_dict(self) -> dict[str, Any]:
        relevant = sorted(f for f in self.flags if f.startswith(("avx", "fma", "sse4", "amx")))
        return {"model": self.model, "flags": relevant, "cores": self.cores}


def host_cpu() -> CpuInfo:
    """Parse ``/proc/cpuinfo`` (first processor); an empty flag set where it is unreadable."""
    model, flags, cores = "", frozenset(), 0
    try:
        text = _CPUINFO.read_text()
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = frozenset(value.split())
        elif key == "processor":
            cores += 1
    return CpuInfo(model=model or platform.processor() or "unknown", flags=flags, cores=max(cores, 1))
