"""The geometry of a 2-D pooling window, shared by the TVM CPU and CUDA backends (no TVM import).

``out = (in + 2*pad - kernel) // stride + 1`` per spatial axis (no dilation, no ceil mode: the
integer graph rejects both).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PoolShape:
    """A 2-D pooling window over int8 ``[n, C, H, W]``."""

    channels: int
    height: int
    width: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int] = (0, 0)

    @property
    def out_hw(self) -> tuple[int, int]:
        (kh, kw), (sh, sw), (ph, pw) = self.kernel, self.stride, self.padding
        return (self.height + 2 * ph - kh) // sh + 1, (self.width + 2 * pw - kw) // sw + 1
