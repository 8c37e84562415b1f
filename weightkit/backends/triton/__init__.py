"""The triton backend: host code that calls the Triton launchers of weightkit.kernels (the top-level kernels/
folder) for every op, one module per hot path. The launchers are imported inside each function, when a Triton kernel
first runs, so that importing weightkit never imports Triton. CUDA tensors, or CPU tensors under TRITON_INTERPRET=1
(how the tests run them without a GPU); weightkit.backend.KernelTable decides when this backend can run."""
