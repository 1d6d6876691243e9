"""TVM CUDA backend: an IntegerGraph as standalone int8 CUDA kernels (dp4a, packed int4 weights).

:class:`fxquant.backends.cuda.target.CudaTarget` (registry name ``cuda``) writes the CUDA source, an
nvcc-built shared library loadable with only the ``apache-tvm-ffi`` wheel, the integer parameters,
golden vectors and ``run_cuda.py`` (bit-exactness check and latency table on a GPU host), plus the
kernels' TIR built for llvm, which is what the export verifies on a machine without a GPU. TVM is
imported only when a build runs. See ``docs/gpu.md``.
"""
