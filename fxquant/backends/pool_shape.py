"""Window geometry shared by the TVM CPU and CUDA backends (no TVM import).

``out = (in + 2*pad - dilation*(kernel-1) - 1) // stride + 1`` per spatial axis (no ceil mode:
the integer graph rejects it); pooling has no dilation.
"""

from __future__ import annotations

from dataclasses import dataclass


def window_out_hw(height: int, width: int, kernel: tuple[int, int], stride: tuple[int, int],
                  padding: tuple[int, int], dilation: tuple[int, int] = (1, 1)) -> tuple[int, int]:
    """Output height and width of a conv or pooling window (formula in the module docstring)."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    return (height + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (width + 2 * pw - dw * (kw - 1) - 1) // sw + 1


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
        return window_out_hw(self.height, self.width, self.kernel, self.stride, self.padding)
