"""The fused fixed-point quantize op used on the training hot path.

``torch.ops.fxquant.quantize(x, bits, frac_bits, grad_bits, stochastic, seed, relu) -> (y, amax)``
computes ``y = clamp(round(x*2^FL), -2^(BW-1), 2^(BW-1)-1) * 2^-FL`` and ``amax = max|x|`` in one
elementwise pass; ``relu=True`` fuses a preceding ReLU (lower clamp 0: ``q(relu(x))`` exactly, and
the backward mask includes ReLU's ``x > 0``), which saves the ReLU's own two passes (formula, tie rule and saturation: :mod:`fxquant.fixed_point`). Its backward is
one fused pass too: the straight-through estimator ``g * [x*2^FL inside the integer range]``,
followed (only when ``grad_bits > 0``) by quantization of the gradient to ``grad_bits`` with a
dynamic FL fitted to the gradient's range.

Widths here are *kernel* widths: ``0`` means off (identity), 2..32 saturate to that signed width
(32 for int32 biases); :mod:`fxquant.quantizers` maps a spec's ``32 = off`` to ``0``.
All precision arguments are 0-d tensors (the quantizer module's buffers), so a policy can change
them every step without retracing or recompiling: the op is a ``torch.library.custom_op``, opaque
to dynamo, with a fake (meta) implementation for ``torch.compile``.

Backends: on CPU a small C kernel (``fixed_point_kernels.c``, OpenMP) is compiled on first use
with the host's ``-march=native`` into ``~/.cache/fxquant`` (keyed by source, compiler flags and
CPU flags, so a machine with another CPU builds its own) and called through ctypes. On other
devices, or with ``FXQUANT_KERNELS=torch``, the same formula runs as composite torch ops.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path

import torch

from fxquant.errors import ToolchainError
from fxquant.io import atomic_write_via_path

_SOURCE = Path(__file__).with_name("fixed_point_kernels.c")
_CFLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-shared", "-fPIC"]
_GRAD_SEED_SALT = 0xA5A5A5A5DEADBEEF


def _cpu_flags() -> str:
    from fxquant.host import host_cpu

    flags = host_cpu().flags
    return " ".join(sorted(flags)) if flags else os.uname().machine


@lru_cache(maxsize=1)
def _library() -> ctypes.CDLL:
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join(_CFLAGS).encode() + _cpu_flags().encode()).hexdigest()[:16]
    cache = Path(os.environ.get("FXQUANT_CACHE", Path.home() / ".cache" / "fxquant"))
    lib_path = cache / f"fixed_point_kernels-{key}.so"
    if not lib_path.exists():
        compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        if compiler is None:
            raise ToolchainError("no C compiler found to build the fused quantize kernel",
                                 "install gcc, or set FXQUANT_KERNELS=torch for the slower torch-ops path")

        def build(tmp_lib: str) -> None:
            proc = subprocess.run([compiler, *_CFLAGS, str(_SOURCE), "-o", tmp_lib, "-lm"],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise ToolchainError(f"building {_SOURCE.name} with {compiler} failed: "
                                     f"{proc.stderr.strip().splitlines()[-1] if proc.stderr else proc.returncode}",
                                     "set FXQUANT_KERNELS=torch to use the torch-ops path")

        atomic_write_via_path(lib_path, build)  # concurrent first uses each build, one rename wins
    lib = ctypes.CDLL(str(lib_path))
    for suffix, ctype in (("f32", ctypes.c_float), ("f64", ctypes.c_double)):
        ptr = ctypes.POINTER(ctype)
        fwd = getattr(lib, f"fxq_quantize_{suffix}")
        fwd.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_int,
                        ctypes.c_int, ctypes.c_uint64, ctypes.c_int, ptr, ctypes.c_int]
        fwd.restype = None
        bwd = getattr(lib, f"fxq_ste_backward_{suffix}")
        bwd.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int,
                        ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_uint64, ctypes.c_int, ctypes.c_int]
        bwd.restype = None
    return lib


def _use_c_kernel(x: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
            and os.environ.get("FXQUANT_KERNELS", "c") != "torch")


def _suffix(x: torch.Tensor) -> str:
    return "f32" if x.dtype == torch.float32 else "f64"


def _torch_quantize(x: torch.Tensor, bits: torch.Tensor, frac_bits: torch.Tensor,
                    stochastic: torch.Tensor, seed: torch.Tensor, relu: bool = False) -> torch.Tensor:
    """The formula as composite torch ops (non-CPU devices; ``FXQUANT_KERNELS=torch``)."""
    if relu:
        x = torch.relu(x)
    scale = torch.ldexp(torch.ones((), dtype=x.dtype, device=x.device), frac_bits.to(x.device))
    half = torch.ldexp(torch.ones((), dtype=x.dtype, device=x.device), (bits - 1).to(x.device))
    scaled = x * scale
    gen = torch.Generator(device=x.device).manual_seed(int(seed))
    rounded = torch.where(stochastic.to(x.device),
                          torch.floor(scaled + torch.rand(x.shape, generator=gen, device=x.device, dtype=x.dtype)),
                          torch.round(scaled))
    y = torch.clamp(rounded, -half, half - 1) / scale
    return torch.where(bits.to(x.device) <= 0, x, y)


def _torch_fit_frac_bits(max_abs: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    _, exponent = torch.frexp(max_abs)
    fl = (bits - 2 - (exponent.to(bits.dtype) - 1)).clamp(-64, 64)
    return torch.where(max_abs > 0, fl, bits - 1)


@torch.library.custom_op("fxquant::quantize", mutates_args=())
def quantize(x: torch.Tensor, bits: torch.Tensor, frac_bits: torch.Tensor, grad_bits: torch.Tensor,
             stochastic: torch.Tensor, seed: torch.Tensor, relu: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed-point quantize with the max magnitude of the input (see module docstring)."""
    if not _use_c_kernel(x):
        y = _torch_quantize(x, bits, frac_bits, stochastic, seed, relu)
        return y, (torch.relu(x) if relu else x.abs()).detach().amax().reshape(())
    x = x.contiguous()
    y = torch.empty_like(x)
    amax = torch.zeros((), dtype=x.dtype)
    fn = getattr(_library(), f"fxq_quantize_{_suffix(x)}")
    fn(x.data_ptr(), y.data_ptr(), x.numel(), int(bits), int(frac_bits), int(bool(stochastic)),
       int(seed) & (2**64 - 1), int(relu), ctypes.cast(amax.data_ptr(), fn.argtypes[8]), torch.get_num_threads())
    return y, amax


@quantize.register_fake
def _(x, bits, frac_bits, grad_bits, stochastic, seed, relu=False):
    return torch.empty_like(x), x.new_empty(())


@torch.library.custom_op("fxquant::ste_backward", mutates_args=())
def ste_backward(grad: torch.Tensor, x: torch.Tensor, bits: torch.Tensor, frac_bits: torch.Tensor,
                 grad_bits: torch.Tensor, stochastic: torch.Tensor, seed: torch.Tensor,
                 relu: bool = False) -> torch.Tensor:
    """Straight-through gradient, then gradient quantization to ``grad_bits`` (dynamic FL)."""
    if not _use_c_kernel(x):
        scaled = x * torch.ldexp(torch.ones((), dtype=x.dtype, device=x.device), frac_bits.to(x.device))
        half = torch.ldexp(torch.ones((), dtype=x.dtype, device=x.device), (bits - 1).to(x.device))
        off = bits.to(x.device) <= 0
        lower = (scaled > 0) if relu else ((scaled >= -half) | off)
        inside = lower & ((scaled <= half - 1) | off)
        g = torch.where(inside, grad, torch.zeros_like(grad))
        fl = _torch_fit_frac_bits(g.abs().amax(), grad_bits.to(g.device))
        return _torch_quantize(g, grad_bits, fl, stochastic, seed ^ _GRAD_SEED_SALT)
    grad, x = grad.contiguous(), x.contiguous()
    out = torch.empty_like(grad)
    getattr(_library(), f"fxq_ste_backward_{_suffix(x)}")(
        grad.data_ptr(), x.data_ptr(), out.data_ptr(), x.numel(), int(bits), int(frac_bits),
        int(grad_bits), int(bool(stochastic)), int(seed) & (2**64 - 1), int(relu), torch.get_num_threads())
    return out


@ste_backward.register_fake
def _(grad, x, bits, frac_bits, grad_bits, stochastic, seed, relu=False):
    return torch.empty_like(grad)


def _setup_context(ctx, inputs, output) -> None:
    x, bits, frac_bits, grad_bits, stochastic, seed, relu = inputs
    ctx.save_for_backward(x, bits, frac_bits, grad_bits, stochastic, seed)
    ctx.relu = relu


def _backward(ctx, grad_y, grad_amax):
    x, bits, frac_bits, grad_bits, stochastic, seed = ctx.saved_tensors
    grad_x = ste_backward(grad_y, x, bits, frac_bits, grad_bits, stochastic, seed, ctx.relu)
    return grad_x, None, None, None, None, None, None


quantize.register_autograd(_backward, setup_context=_setup_context)
