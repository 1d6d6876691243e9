"""Host CPU feature detection and the LLVM target a build uses.

``/proc/cpuinfo`` flags decide which integer dot-product path the host can *run*:

* ``avx512_vnni`` (with ``avx512bw``): ``vpdpbusd`` (u8 x s8 -> s32, 64 products per instruction);
* ``avx2``: ``vpmaddwd`` (s16 x s16 -> s32 pairs, exact) and ``vpmaddubsw`` (u8 x s8 -> s16 pairs,
  exact only while the pair sum fits int16: used for weights of 4 bits or fewer).

``--mcpu`` picks the *code* that is generated: ``host`` (LLVM's name of this CPU), or a named CPU
such as ``znver5`` (AVX-512 VNNI) or ``x86-64-v3`` (AVX2 + FMA). Any target can be compiled on
any machine; running code for a CPU the host lacks dies with "Illegal instruction", so
:func:`check_runnable` refuses it with a :class:`~fxquant.errors.ToolchainError` first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fxquant.errors import ToolchainError, UsageError
from fxquant.host import CpuInfo, host_cpu  # noqa: F401  (re-exported for the CPU backend)

_MCPU_FEATURES: dict[str, frozenset[str]] = {
    "x86-64-v3": frozenset({"avx2", "fma"}),
    "znver3": frozenset({"avx2", "fma"}),
    "znver4": frozenset({"avx2", "fma", "avx512f", "avx512bw", "avx512_vnni"}),
    "znver5": frozenset({"avx2", "fma", "avx512f", "avx512bw", "avx512_vnni"}),
    "skylake-avx512": frozenset({"avx2", "fma", "avx512f", "avx512bw"}),
    "cascadelake": frozenset({"avx2", "fma", "avx512f", "avx512bw", "avx512_vnni"}),
    "icelake-server": frozenset({"avx2", "fma", "avx512f", "avx512bw", "avx512_vnni"}),
    "sapphirerapids": frozenset({"avx2", "fma", "avx512f", "avx512bw", "avx512_vnni"}),
}
SUPPORTED_MCPU = ("host",) + tuple(_MCPU_FEATURES)


@dataclass(frozen=True)
class LlvmCpu:
    """The code a build generates: LLVM ``mcpu`` and whether the VNNI path is used."""

    mcpu: str
    vnni: bool

    def tvm_target(self) -> dict[str, Any]:
        return {"kind": "llvm", "mcpu": self.mcpu, "num-cores": host_cpu().cores}


def resolve_target(mcpu: str = "host") -> LlvmCpu:
    """``host`` -> the host's LLVM CPU name and features; a named CPU -> its known features."""
    if mcpu == "host":
        info = host_cpu()
        if not info.has_avx2:
            raise ToolchainError(f"host CPU {info.model!r} has no AVX2 + FMA",
                                 "the fxquant CPU kernels need at least x86-64-v3")
        from tvm.target import codegen

        return LlvmCpu(mcpu=str(codegen.llvm_get_system_cpu()), vnni=info.has_vnni)
    if mcpu not in _MCPU_FEATURES:
        raise UsageError(f"--mcpu {mcpu!r} is not supported", f"use one of {', '.join(SUPPORTED_MCPU)}")
    return LlvmCpu(mcpu=mcpu, vnni="avx512_vnni" in _MCPU_FEATURES[mcpu])


def uses_vnni(mcpu: str = "host") -> bool:
    """Whether a build for ``mcpu`` takes the VNNI linear path (no TVM import: ``check`` uses it)."""
    if mcpu == "host":
        return host_cpu().has_vnni
    if mcpu not in _MCPU_FEATURES:
        raise UsageError(f"--mcpu {mcpu!r} is not supported", f"use one of {', '.join(SUPPORTED_MCPU)}")
    return "avx512_vnni" in _MCPU_FEATURES[mcpu]


def check_runnable(target: LlvmCpu) -> None:
    """Raise :class:`ToolchainError` when code built for ``target`` would not run on this host."""
    info = host_cpu()
    needed = {"avx2", "fma"} | ({"avx512f", "avx512bw", "avx512_vnni"} if target.vnni else set())
    needed |= _MCPU_FEATURES.get(target.mcpu, frozenset())
    missing = sorted(needed - info.flags)
    if missing:
        raise ToolchainError(f"code for mcpu={target.mcpu} needs {', '.join(missing)}, which the host "
                             f"CPU {info.model!r} lacks (it would die with 'Illegal instruction')",
                             "build with --mcpu host or x86-64-v3 to run here, or run on a matching CPU")
