"""Triton kernels, one module per hot path, shipped as ``weightkit.kernels``.

Each module holds the ``@triton.jit`` kernels and the launchers that the ops in ``weightkit.ops`` call for
the ``triton`` backend. Import them lazily (they need triton); on a machine without a GPU they run under
``TRITON_INTERPRET=1``, which must be set before the first import.
"""
