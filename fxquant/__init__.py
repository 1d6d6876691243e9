"""fxquant: schedule-aware fixed-point quantization passes for torch.fx, precision policies
(CPT, AdaPT), and integer deployment to ONNX, TVM (CPU/GPU) and HLS C++."""

__version__ = "0.1.0"
