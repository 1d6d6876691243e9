"""Window geometry shared by the TVM CPU and CUDA backends (no TVM import).

Output sizes are :func:`fxquant.integer_graph.pool_output_size` per spatial axis (torch's rule:
``(in + 2*pad - dilation*(kernel-1) - 1) // stride + 1``, rounded up with ``ceil_mode`` as long as
the last window starts inside the input or its left padding).
"""

from __future__ import annotations

from dataclasses import dataclass

from fxquant.integer_graph import pool_output_size


def window_out_hw(height: int, width: int, kernel: tuple[int, int], stride: tuple[int, int],
                  padding: tuple[int, int], dilation: tuple[int, int] = (1, 1),
                  ceil_mode: bool = False) -> tuple[int, int]:
    """Output height and width of a conv or pooling window (rule in the module docstring)."""
    oh, ow = (pool_output_size(n, k, s, p, d, ceil_mode)
              for n, k, s, p, d in zip((height, width), kernel, stride, padding, dilation))
    return oh, ow


@dataclass(frozen=True)
class PoolShape:
    """A 2-D pooling window over int8 ``[n, C, H, W]`` with torch's dilation and ``ceil_mode``."""

    channels: int
    height: int
    width: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    ceil_mode: bool = False

    @property
    def out_hw(self) -> tuple[int, int]:
        return window_out_hw(self.height, self.width, self.kernel, self.stride, self.padding, self.dilation,
                             self.ceil_mode)
