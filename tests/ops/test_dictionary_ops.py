"""weightkit::dict_bitmask_matmul (S in CoSpaDi's bitmask format) and its helpers: every backend == float64
reference (fwd, bwd), gradcheck, compile, errors."""

import pytest
import torch

from tests.conftest import skip_module_without_triton_kernels

skip_module_without_triton_kernels()

import triton  # noqa: E402
import triton.language as tl

from weightkit import debug_checks, native
from weightkit.backends.cpu import dictionary as cpu_dictionary

from tests.conftest import CUDASIM, DEVICES, usable_backends
from weightkit import use_backend
from weightkit.ops import dictionary as dict_ops
from weightkit.ops.dictionary import index_dtype_for
from weightkit.kernels.dictionary import _popc

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
       torch.float16: dict(rtol=2e-3, atol=2e-3)}


def test_index_dtype_for():
    assert index_dtype_for(256) == torch.uint8 and index_dtype_for(257) == torch.int16
    assert index_dtype_for(40000) == torch.int32


def test_the_ell_op_is_gone():
    """dict_sparse_gather had no caller left (issue #26): ELL factors are converted to the bitmask format on load."""
    assert not hasattr(dict_ops, "dict_sparse_gather")
    assert not hasattr(torch.ops.weightkit, "dict_sparse_gather")


# ---------------------------------------------------------------------------------------------------------
# S in the bitmask format (weightkit::dict_bitmask_matmul) and its helpers.

from weightkit.ops.dictionary import (bitmask_code_bytes, bitmask_to_dense, bitmask_to_indices, bitmask_words,  # noqa: E402
                                      check_bitmask_data, dict_bitmask_matmul, offset_dtype_for, pack_bitmask,
                                      unpack_bitmask, word_offsets_for)

BITMASK_SHAPES = [(5, 70, 9, 13), (3, 64, 64, 5), (4, 33, 1, 7), (2, 32, 16, 3), (1, 300, 260, 4), (17, 100, 50, 40)]


def ell(k, s, d_out, device="cpu", dtype=torch.float32):
    """Random S as ELL: s distinct atoms per column, in random order, and their values."""
    idx = torch.rand(k, d_out, device=device).argsort(0)[:s]
    return idx, torch.randn(s, d_out, device=device).to(dtype)


def bitmask_inputs(n, k, s, d_out, dtype=torch.float32, device="cpu"):
    idx, values = ell(k, s, d_out, device, dtype)
    bitmask, values, offsets = pack_bitmask(idx.to(index_dtype_for(k)), values, k)
    return torch.randn(n, k, device=device).to(dtype), values, bitmask, offsets


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,k,s,d_out", BITMASK_SHAPES)
def test_bitmask_pack_unpack_round_trip(device, n, k, s, d_out):
    idx, values = ell(k, s, d_out, device)
    bitmask, sorted_values, offsets = pack_bitmask(idx.to(index_dtype_for(k)), values, k)
    assert bitmask.dtype == torch.int32 and bitmask.shape == (bitmask_words(k), d_out) == offsets.shape
    assert offsets.dtype == offset_dtype_for(s) == (torch.uint8 if s <= 255 else torch.int16)
    dense = torch.zeros(k, d_out, device=device).scatter_(0, idx, values)
    assert torch.equal(unpack_bitmask(bitmask, k), dense != 0)
    assert torch.equal(bitmask_to_dense(bitmask, sorted_values, k), dense)
    ascending = idx.sort(0)
    assert torch.equal(bitmask_to_indices(bitmask, k, s), ascending.values)
    assert torch.equal(sorted_values, values.gather(0, ascending.indices))  # values follow their atoms
    # the bits themselves: bit a % 32 of word a // 32 of column j, for every used atom a
    words = bitmask.long() & 0xFFFFFFFF
    assert bool(((words.gather(0, idx // 32) >> (idx % 32)) & 1).all())
    counts = (dense != 0).reshape(-1, d_out)
    counts = torch.nn.functional.pad(counts, (0, 0, 0, bitmask_words(k) * 32 - k)).reshape(-1, 32, d_out).sum(1)
    assert torch.equal(offsets.long(), counts.cumsum(0) - counts)
    check_bitmask_data(bitmask, k, s, offsets)
    assert bitmask_code_bytes(k, s, d_out, 4) == sum(t.numel() * t.element_size() for t in (sorted_values, bitmask,
                                                                                           offsets))


def test_bitmask_edge_cases_and_bad_codes():
    k = 64
    full = torch.arange(k)[:, None].expand(k, 3)
    bitmask, _, offsets = pack_bitmask(full.to(torch.uint8), torch.ones(k, 3), k)
    assert (bitmask == -1).all() and torch.equal(offsets[1], torch.full((3,), 32, dtype=torch.uint8))
    bitmask, _, _ = pack_bitmask(torch.tensor([[31, 0, 63]], dtype=torch.uint8), torch.ones(1, 3), k)
    assert bitmask.tolist() == [[-(1 << 31), 1, 0], [0, 0, -(1 << 31)]]
    with pytest.raises(ValueError, match="distinct atoms per column"):
        pack_bitmask(torch.tensor([[1], [1]], dtype=torch.uint8), torch.ones(2, 1), 8)
    with pytest.raises(ValueError, match=r"indices must lie in \[0, k=8\)"):
        pack_bitmask(torch.tensor([[8]], dtype=torch.uint8), torch.ones(1, 1), 8)
    with pytest.raises(ValueError, match="k must be an int >= s=2"):
        pack_bitmask(torch.tensor([[0], [1]], dtype=torch.uint8), torch.ones(2, 1), 1)
    bitmask = torch.tensor([[0b111]], dtype=torch.int32)
    with pytest.raises(ValueError, match="exactly s=2 bits per column"):
        check_bitmask_data(bitmask, 8, 2)
    with pytest.raises(ValueError, match="bits of atoms >= k=2"):
        check_bitmask_data(bitmask, 2, 3)
    with pytest.raises(ValueError, match="word_offsets must hold"):
        check_bitmask_data(torch.tensor([[0b11], [0b1]], dtype=torch.int32), 40, 3,
                           torch.tensor([[0], [1]], dtype=torch.uint8))


def bitmask_ref64(z, values, bitmask, grad=None):
    """float64 y = z S with S built by scatter from ELL indices (independent of the op's own unpacking)."""
    k = z.shape[1]
    idx = bitmask_to_indices(bitmask, k, values.shape[0])
    z64 = z.double().requires_grad_(True)
    v64 = values.double().requires_grad_(True)
    y = z64 @ torch.zeros(k, values.shape[1], dtype=torch.float64, device=z.device).scatter(0, idx, v64)
    if grad is None:
        return y.detach()
    return torch.autograd.grad(y, (z64, v64), grad.double())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k,s,d_out", BITMASK_SHAPES)
def test_bitmask_backends_match_float64(device, dtype, n, k, s, d_out):
    z, values, bitmask, offsets = bitmask_inputs(n, k, s, d_out, dtype, device)
    g = torch.randn(n, d_out, device=device).to(dtype)
    y64 = bitmask_ref64(z, values, bitmask)
    gz64, gv64 = bitmask_ref64(z, values, bitmask, g)
    fwd, bwd = usable_backends(dict_ops._BM_FWD, device), usable_backends(dict_ops._BM_BWD, device)
    if not CUDASIM:
        assert "triton" in fwd and "triton" in bwd, (fwd, bwd)
    if device == "cpu" and native.CPU is not None:
        assert "cpu" in fwd and "cpu" in bwd, (fwd, bwd)
    # tolerances scale with the length of the sums (k for y and grad_values' n, d_out for grad_z)
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    for name in fwd:
        with use_backend(name):
            y = dict_bitmask_matmul(z, values, bitmask, offsets)
            zr, vr = z.clone().requires_grad_(True), values.clone().requires_grad_(True)
            gz, gv = torch.autograd.grad(dict_bitmask_matmul(zr, vr, bitmask, offsets), (zr, vr), g)
        assert y.dtype == gz.dtype == gv.dtype == dtype
        torch.testing.assert_close(y.double(), y64, rtol=tol, atol=tol * k ** 0.5, msg=lambda m: f"{name} fwd: {m}")
        torch.testing.assert_close(gz.double(), gz64, rtol=tol, atol=tol * d_out ** 0.5,
                                   msg=lambda m: f"{name} grad z: {m}")
        torch.testing.assert_close(gv.double(), gv64, rtol=tol, atol=tol * n ** 0.5,
                                   msg=lambda m: f"{name} grad values: {m}")


@pytest.mark.parametrize("device", DEVICES)
def test_bitmask_non_contiguous_inputs(device):
    z_big, values, bitmask, offsets = bitmask_inputs(40, 90, 12, 30, device=device)
    z = z_big[::2]  # (20, 90), strided rows
    values = values.T.contiguous().T  # column-major
    g = torch.randn(30, 20, device=device).T
    assert not z.is_contiguous() and not values.is_contiguous() and not g.is_contiguous()
    y64 = bitmask_ref64(z, values, bitmask)
    gz64, gv64 = bitmask_ref64(z, values, bitmask, g)
    for name in usable_backends(dict_ops._BM_FWD, device):
        with use_backend(name):
            zr, vr = z.clone().requires_grad_(True), values.clone().requires_grad_(True)
            y = dict_bitmask_matmul(z, values, bitmask, offsets)
            gz, gv = torch.autograd.grad(dict_bitmask_matmul(zr, vr, bitmask, offsets), (zr, vr), g)
        torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-4, msg=lambda m: f"{name} fwd: {m}")
        torch.testing.assert_close(gz.double(), gz64, rtol=1e-5, atol=1e-4, msg=lambda m: f"{name} grad z: {m}")
        torch.testing.assert_close(gv.double(), gv64, rtol=1e-5, atol=1e-4, msg=lambda m: f"{name} grad values: {m}")


def test_bitmask_gradcheck_reference():
    z, values, bitmask, offsets = bitmask_inputs(4, 40, 3, 5, torch.float64)
    z.requires_grad_(True)
    values.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda a, b: dict_ops.dict_bitmask_matmul_reference(a, b, bitmask, offsets), (z, values))
    assert torch.autograd.gradcheck(
        lambda a, b: dict_ops._bm_fwd_op(a.float(), b.float(), bitmask, offsets).double(), (z, values), eps=1e-3,
        atol=1e-2, rtol=1e-2)


def test_bitmask_torch_compile():
    z, values, bitmask, offsets = bitmask_inputs(6, 40, 4, 9)
    torch._dynamo.reset()
    compiled = torch.compile(lambda a: dict_bitmask_matmul(a * 2, values, bitmask, offsets), fullgraph=True)
    torch.testing.assert_close(compiled(z), dict_bitmask_matmul(z * 2, values, bitmask, offsets))


@pytest.mark.parametrize("change,err,match", [
    (lambda a: a.update(bitmask=torch.zeros(1, 9, dtype=torch.int32)), ValueError,
     r"bitmask must have shape \(ceil\(k/32\), d_out\) = \(2, 9\)"),
    (lambda a: a.update(bitmask=a["bitmask"].long()), TypeError, "bitmask must have dtype in \\(int32\\)"),
    (lambda a: a.update(word_offsets=a["word_offsets"][:1]), ValueError, "word_offsets .* must have bitmask's shape"),
    (lambda a: a.update(word_offsets=a["word_offsets"].float()), TypeError, "word_offsets must have dtype"),
    (lambda a: a.update(values=torch.randn(41, 9)), ValueError, "values has s=41 rows, more than the k=40 atoms"),
    (lambda a: a.update(values=torch.randn(4, 9, dtype=torch.float64)), TypeError, "values must have dtype"),
    (lambda a: a.update(z=torch.randn(6, 40, 2)), ValueError, "z must be 2-D"),
    (lambda a: a.update(values=torch.randn(4, 9, device="meta")), ValueError, "values is on meta"),
    (lambda a: a.update(bitmask=a["bitmask"] | 1), ValueError, "exactly s=4 bits per column"),
    (lambda a: a.update(word_offsets=torch.zeros_like(a["word_offsets"])), ValueError, "word_offsets must hold"),
    (lambda a: a.update(z=torch.full((6, 40), float("nan"))), ValueError, "z contains 240 non-finite"),
])
def test_bitmask_bad_input(change, err, match):
    z, values, bitmask, offsets = bitmask_inputs(6, 40, 4, 9)
    args = dict(z=z, values=values, bitmask=bitmask, word_offsets=offsets)
    change(args)
    with pytest.raises(err, match=match), debug_checks():  # data checks (bit counts, offsets, NaN) are opt-in
        dict_bitmask_matmul(args["z"], args["values"], args["bitmask"], args["word_offsets"])


def test_bitmask_offsets_dtype_must_hold_s():
    z, values, bitmask, offsets = bitmask_inputs(2, 600, 300, 3)
    assert offsets.dtype == torch.int16
    with pytest.raises(TypeError, match="word_offsets of dtype uint8 cannot count s=300 nonzeros; use int16"):
        dict_bitmask_matmul(z, values, bitmask, offsets.to(torch.uint8))
    assert torch.equal(word_offsets_for(bitmask, 300), offsets)


@pytest.mark.parametrize("n", [1, 3, 20, 70])  # GEMV (<= 4 tokens), tensor cores with split-K, and without
def test_bitmask_triton_tuned_path(monkeypatch, n):
    """The autotuned launch (taken for S with >= TUNE_MIN_WEIGHT entries; lowered here so that a small S takes it
    too): split-K partials summed in order, for the forward and both gradients."""
    from weightkit.kernels import dictionary as kernels

    if torch.cuda.is_available():  # compiled: an S big enough for the autotuner (K N >= TUNE_MIN_WEIGHT)
        device, k, s, d_out = "cuda", 1100, 530, 1000
        assert k * d_out >= kernels.TUNE_MIN_WEIGHT
    else:
        monkeypatch.setattr(kernels, "TUNE_MIN_WEIGHT", 0)
        device, k, s, d_out = "cpu", 200, 90, 150
    z, values, bitmask, offsets = bitmask_inputs(n, k, s, d_out, device=device)
    g = torch.randn(n, d_out, device=device)
    y = kernels.dict_bitmask_matmul_triton(z, values, bitmask, offsets)
    gz, gv = kernels.dict_bitmask_matmul_backward_triton(g, z, values, bitmask, offsets)
    gz64, gv64 = bitmask_ref64(z, values, bitmask, g)
    torch.testing.assert_close(y.double(), bitmask_ref64(z, values, bitmask), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(gz.double(), gz64, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(gv.double(), gv64, rtol=1e-5, atol=1e-4)


@pytest.mark.skipif(native.CPU is None, reason="CPU kernel library not loaded")
@pytest.mark.parametrize("path", ["direct", "dense", "dense_blocked"])
@pytest.mark.parametrize("z_dtype,v_dtype,g_dtype", [
    (torch.float32, torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16, torch.float16), (torch.float32, torch.bfloat16, torch.float16),
    (torch.bfloat16, torch.float32, torch.float32), (torch.float16, torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("offset_dtype", [None, torch.int16, torch.int32])
def test_bitmask_cpu_kernels_both_paths(monkeypatch, path, z_dtype, v_dtype, g_dtype, offset_dtype):
    """The cpu backend's paths (the bitmask read directly; S^T decoded to dense around BLAS, whole or 37 columns at a
    time) forced for the same inputs: float64 agreement, output dtypes (y, grad_z: z's; grad_values: values'), every
    word_offsets dtype, mixed dtypes, a k that is not a multiple of 32, more columns than one task block, and the same
    bits run to run."""
    n, k, s, d_out = 11, 301, 120, 300
    monkeypatch.setattr(cpu_dictionary, "DICT_BITMASK_DIRECT_TOKENS", 10 ** 9 if path == "direct" else 0)
    if path == "dense_blocked":
        monkeypatch.setattr(cpu_dictionary, "DICT_BITMASK_DENSE_BLOCK", 37 * k)
        assert len(cpu_dictionary.bitmask_blocks(k, d_out)[0]) == 9
    z, values, bitmask, offsets = bitmask_inputs(n, k, s, d_out)
    z, values = z.to(z_dtype), values.to(v_dtype)
    offsets = offsets if offset_dtype is None else offsets.to(offset_dtype)
    g = torch.randn(n, d_out).to(g_dtype)
    y64 = bitmask_ref64(z, values, bitmask)
    gz64, gv64 = bitmask_ref64(z, values, bitmask, g)
    with use_backend("cpu"):
        y = dict_bitmask_matmul(z, values, bitmask, offsets)
        gz, gv = dict_ops._bm_bwd_op(g, z, values, bitmask, offsets)
        again = (dict_bitmask_matmul(z, values, bitmask, offsets),) + tuple(dict_ops._bm_bwd_op(g, z, values, bitmask,
                                                                                                 offsets))
    assert (y.dtype, gz.dtype, gv.dtype) == (z_dtype, z_dtype, v_dtype)
    for got, repeat in zip((y, gz, gv), again):
        assert torch.equal(got, repeat)
    tol = max({torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[t] for t in (z_dtype, v_dtype, g_dtype))
    torch.testing.assert_close(y.double(), y64, rtol=tol, atol=tol * k ** 0.5)
    torch.testing.assert_close(gz.double(), gz64, rtol=tol, atol=tol * d_out ** 0.5)
    torch.testing.assert_close(gv.double(), gv64, rtol=tol, atol=tol * n ** 0.5)


@pytest.mark.skipif(native.CPU is None, reason="CPU kernel library not loaded")
def test_bitmask_cpu_results_do_not_depend_on_threads(monkeypatch):
    """The direct kernels (forced here for 5 tokens) give the same bits on 1 and 3 threads: each output's sum has a
    fixed order (grad_z: fixed column blocks' partials added in order), whatever the split."""
    monkeypatch.setattr(cpu_dictionary, "DICT_BITMASK_DIRECT_TOKENS", 10 ** 9)
    z, values, bitmask, offsets = bitmask_inputs(5, 200, 80, 700)
    g = torch.randn(5, 700)
    threads = torch.get_num_threads()
    outs = []
    try:
        for t in (1, 3):
            torch.set_num_threads(t)
            with use_backend("cpu"):
                outs.append((dict_bitmask_matmul(z, values, bitmask, offsets),)
                            + tuple(dict_ops._bm_bwd_op(g, z, values, bitmask, offsets)))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*outs):
        assert torch.equal(a, b)


@pytest.mark.skipif(native.CPU is None, reason="CPU kernel library not loaded")
@pytest.mark.parametrize("tokens", [2, 9])  # the direct kernels and the dense path
@pytest.mark.parametrize("corrupt", ["extra bit", "missing bit", "bit beyond k", "offsets"])
def test_bitmask_cpu_kernels_refuse_malformed_codes(tokens, corrupt):
    """Without debug checks the codes are not validated up front; the cpu kernels check what they decode (no read or
    write out of bounds) and fail with a clear error instead."""
    z, values, bitmask, offsets = bitmask_inputs(tokens, 40, 4, 9)
    bitmask = bitmask.clone()
    if corrupt == "extra bit":
        unused = [a for a in range(40) if not unpack_bitmask(bitmask, 40)[a, 3] and a % 32 != 31]
        bitmask[unused[0] // 32, 3] |= 1 << (unused[0] % 32)
    elif corrupt == "missing bit":
        bitmask[:, 3] = 0
    elif corrupt == "bit beyond k":
        bitmask[1, 3] |= 1 << 20  # atom 52
    else:
        offsets = torch.zeros_like(offsets)
    g = torch.randn(tokens, 9)
    with use_backend("cpu"):
        for run in (lambda: dict_bitmask_matmul(z, values, bitmask, offsets),
                    lambda: dict_ops._bm_bwd_op(g, z, values, bitmask, offsets)):
            with pytest.raises(RuntimeError, match="malformed codes"):
                run()


def _far_offsets_inputs(n, device="cpu"):
    """k = 256, s = 128, 40 columns: column 0 uses atoms 0..127, column 1 atoms 128..255 (so at atom 64 their
    offsets differ by 64 and more: a 64-atom tile's values span more than its 64 rows), the others random atoms."""
    k, s, d_out = 256, 128, 40
    idx = torch.rand(k, d_out).argsort(0)[:s]
    idx[:, 0] = torch.arange(0, 128)
    idx[:, 1] = torch.arange(128, 256)
    bitmask, values, offsets = pack_bitmask(idx.to(device), torch.randn(s, d_out, device=device), k)
    return torch.randn(n, k, device=device), values, bitmask, offsets


@pytest.mark.parametrize("span", [0, 1])
@pytest.mark.parametrize("n", [1, 3, 20])  # the GEMV (<= 4 tokens) and the tensor-core kernels
@pytest.mark.parametrize("inputs", ["random", "far offsets"])
def test_bitmask_triton_value_loads(monkeypatch, span, n, inputs):
    """Both value loads of the Triton decode (SPAN 0: each value where it lies; 1: the tile's row span in one block,
    picked in registers, set bits past the block loaded where they lie), in the forward and both gradients, on random
    codes and on codes whose columns' offsets differ by more than a tile (the far branch)."""
    from weightkit.kernels import _shared, dictionary as kernels

    if torch.cuda.is_available():
        pytest.skip("the fixed configs are those of small layers; the compiled path runs in the tuned-path test")
    monkeypatch.setattr(kernels, "FIXED_SPAN", span)
    _shared.clear_launch_caches()
    try:
        if inputs == "random":
            z, values, bitmask, offsets = bitmask_inputs(n, 300, 140, 70)
        else:
            z, values, bitmask, offsets = _far_offsets_inputs(n)
        g = torch.randn(n, values.shape[1])
        y = kernels.dict_bitmask_matmul_triton(z, values, bitmask, offsets)
        gz, gv = kernels.dict_bitmask_matmul_backward_triton(g, z, values, bitmask, offsets)
    finally:
        _shared.clear_launch_caches()
    gz64, gv64 = bitmask_ref64(z, values, bitmask, g)
    torch.testing.assert_close(y.double(), bitmask_ref64(z, values, bitmask), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(gz.double(), gz64, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(gv.double(), gv64, rtol=1e-5, atol=1e-4)


@triton.jit
def _popc_kernel(x_ptr, y_ptr, BLOCK: tl.constexpr):
    r = tl.arange(0, BLOCK)
    tl.store(y_ptr + r, _popc(tl.load(x_ptr + r)))


def test_bitmask_popcount():
    """The decode's popcount (under the interpreter the SWAR form; on a GPU the popc instruction) on int32 words of
    every sign, against Python's bit count."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randint(-2**31, 2**31 - 1, (256,), dtype=torch.int32)
    x[:4] = torch.tensor([0, -1, -2**31, 2**31 - 1], dtype=torch.int32)
    y = torch.empty_like(x, device=device)
    _popc_kernel[(1,)](x.to(device), y, BLOCK=256)
    expected = torch.tensor([bin(v & 0xFFFFFFFF).count("1") for v in x.tolist()], dtype=torch.int32)
    assert torch.equal(y.cpu(), expected)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 37])
def test_bitmask_cuda_decode_passes(dtype, n):
    """The cuda backend where columns hold more nonzeros than a block stages at once (481 fp32, 910 bf16 rows: the
    kernels take several passes), k not a multiple of 32, and d_out not a multiple of the 16-column tile; grad_values
    is deterministic (each entry written once)."""
    from weightkit.ops.dictionary import _BM_FWD

    if _BM_FWD.why_not("cuda", torch.device("cuda")) is not None:
        pytest.skip(_BM_FWD.why_not("cuda", torch.device("cuda")))
    z, values, bitmask, offsets = bitmask_inputs(n, 2100, 1000, 77, dtype, "cuda")
    g = torch.randn(n, 77, device="cuda").to(dtype)
    with use_backend("cuda"):
        y = dict_bitmask_matmul(z, values, bitmask, offsets)
        gz, gv = dict_ops._bm_bwd_op(g, z, values, bitmask, offsets)
        gz2, gv2 = dict_ops._bm_bwd_op(g, z, values, bitmask, offsets)
    assert torch.equal(gv, gv2) and torch.equal(gz, gz2)
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    gz64, gv64 = bitmask_ref64(z, values, bitmask, g)
    torch.testing.assert_close(y.double(), bitmask_ref64(z, values, bitmask), rtol=tol, atol=tol * 2100 ** 0.5)
    torch.testing.assert_close(gz.double(), gz64, rtol=tol, atol=tol * 77 ** 0.5)
    torch.testing.assert_close(gv.double(), gv64, rtol=tol, atol=tol * n ** 0.5)
    dense_t = dict_ops.bitmask_to_dense(bitmask, values, 2100).T
    from weightkit.backends.cuda import dictionary as cuda_dictionary
    assert torch.equal(cuda_dictionary._dense_t(values, bitmask, offsets, 2100, values.dtype), dense_t)


def test_bitmask_cuda_backend_is_registered_and_falls_back():
    """The cuda implementation is in both tables (auto on CUDA: triton first, then cuda); where it cannot run (no
    CUDA tensor, no CUDA library) the table says why, so auto takes another backend."""
    for table in (dict_ops._BM_FWD, dict_ops._BM_BWD):
        assert "cuda" in table.impls and table.cuda_order == ("triton", "cuda")
        assert table.why_not("cuda", torch.device("cpu")).startswith("the cuda backend runs CUDA tensors")
    if native.CUDA is None:
        assert "CUDA kernel library unusable" in dict_ops._BM_FWD.why_not("cuda", torch.device("cuda"))
