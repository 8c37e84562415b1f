"""Triton kernels, one module per hot path, shipped as ``weightkit.kernels``.

Each per-op module (int8, int4, dictionary, memoryformer, galore) holds the ``@triton.jit`` kernels and the launchers
that the ``triton`` backend of the ops calls; what they share (the interpreter switch, the device guard, the launch
plumbing that keeps the autotuner off the call path, the split-K reduction, tile helpers and the quantized GEMV/GEMM
dispatch) is in ``_shared``, the only module they import. Import them lazily (they need triton); on a machine without
a GPU they run under ``TRITON_INTERPRET=1``, which must be set before the first import.

This folder is the top-level ``kernels/`` of a weightkit checkout (setup.py maps it to ``weightkit.kernels``). Where
the checkout's root is on ``sys.path`` (``python -m ...`` or pytest run from there), ``import kernels`` would find
this folder instead of the installed package of that name (Hugging Face's ``kernels``, which transformers and
bitsandbytes import). The top-level name is not ours: imported under it, this module loads the installed package
in its place, or raises the ModuleNotFoundError that code probing for that package expects when there is none.
"""

if __name__ == "kernels":
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    _checkout = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _elsewhere = [p for p in _sys.path if _os.path.abspath(p or _os.getcwd()) != _checkout]
    _spec = _machinery.PathFinder.find_spec("kernels", _elsewhere)
    if _spec is None or _spec.loader is None:
        del _sys.modules["kernels"]
        raise ModuleNotFoundError("No module named 'kernels' (the weightkit checkout's kernels/ folder is "
                                  "weightkit.kernels)", name="kernels")
    _module = _util.module_from_spec(_spec)
    _sys.modules["kernels"] = _module  # the import statement returns what sys.modules holds after this body
    _spec.loader.exec_module(_module)
