"""Triton kernels, one module per hot path, shipped as ``weightkit.kernels``.

Each per-op module (int8, int4, dictionary, memoryformer, galore) holds the ``@triton.jit`` kernels and the launchers
that the ``triton`` backend of the ops calls; what they share (the interpreter switch, the device guard, the launch
plumbing that keeps the autotuner off the call path, the split-K reduction, tile helpers and the quantized GEMV/GEMM
dispatch) is in ``_shared``, the only module they import. Import them lazily (they need triton); on a machine without
a GPU they run under ``TRITON_INTERPRET=1``, which must be set before the first import.
"""
