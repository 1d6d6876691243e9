"""CPU feature detection and target resolution (no TVM build)."""

from __future__ import annotations

import pytest

from fxquant.backends.cpu import features
from fxquant.errors import ToolchainError, UsageError


def test_host_cpu_reads_cpuinfo() -> None:
    info = features.host_cpu()
    assert info.cores >= 1 and info.model
    assert info.has_avx2 == ({"avx2", "fma"} <= info.flags)
    assert set(info.to_dict()) == {"model", "flags", "cores"}


def test_named_targets() -> None:
    assert features.resolve_target("znver5").vnni
    assert not features.resolve_target("x86-64-v3").vnni
    with pytest.raises(UsageError, match="mcpu"):
        features.resolve_target("pentium4")


def test_host_target_follows_flags() -> None:
    target = features.resolve_target("host")
    assert target.vnni == features.host_cpu().has_vnni
    assert target.mcpu and target.mcpu != "host"


def test_unrunnable_target_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    avx2_only = features.CpuInfo("test CPU", frozenset({"avx2", "fma"}), 2)
    monkeypatch.setattr(features, "host_cpu", lambda: avx2_only)
    features.check_runnable(features.resolve_target("x86-64-v3"))
    with pytest.raises(ToolchainError, match="Illegal instruction"):
        features.check_runnable(features.resolve_target("znver5"))


def test_uses_vnni_needs_no_tvm() -> None:
    assert features.uses_vnni("znver5") and not features.uses_vnni("x86-64-v3")
    assert features.uses_vnni("host") == features.host_cpu().has_vnni
    with pytest.raises(UsageError, match="pentium4"):
        features.uses_vnni("pentium4")
