"""One folder per backend, each holding that backend's host code for every op (the ops themselves, with their
schema, checks, fake, autograd and reference, are in weightkit/ops):

* ``cpu``: calls the CPU kernels of weightkit._C (csrc/cpu) on CPU tensors;
* ``cuda``: calls the CUDA kernels of libweightkit_cuda.so (csrc/cuda, opened by weightkit._C) on CUDA tensors, on
  torch's current stream of the tensors' device;
* ``triton``: calls the Triton launchers of weightkit.kernels (imported when a Triton kernel first runs).

A module ``backends/<name>/<hot path>.py`` has one function per op, named like the op, taking the op's arguments
after its checks. Which backend runs is decided in one place, weightkit.backend.KernelTable (per op and device); no
function here branches on the device. ``_blocked.py`` is torch code shared by the cpu and cuda matmuls.
"""
