"""The cuda backend's kernel paths that the op tests' small shapes do not reach, run on cudasim
(tests/test_cudasim.py passes this file explicitly to a pytest with ``-p tests.cudasim.plugin``; it is not collected
otherwise: its name does not start with ``test_``).

* MemoryLinear's forward with its tables split across blocks (the last block of each tile adds the fp32 partials)
  and 1, 2 and 4 tokens per block, vector (16-byte) and scalar table loads; bits independent of the block order;
* the backward's counting sort over several rounds of 32 tokens and of 4 keys in flight, torch.sort above 1024
  buckets, the atomics and the segment table gradient;
* the dictionary decode and gather with more nonzeros per column than one shared-memory stage holds (several
  passes), with uint8 and int16 word offsets;
* the int8 dequantization's vector kernel with groups not a multiple of 16 and its scalar kernel;
* the int8 and INT4 GEMVs of 1-8 tokens: every token block and rows-per-warp instantiation, the host's plan and
  refusals;
* an entry point's refusal of a bad launch argument.
"""

import os

import pytest
import torch

from tests.conftest import assert_quantized_matmul_contract
from tests.ops.test_dictionary_ops import bitmask_inputs, bitmask_ref64
from weightkit import native, use_backend
from weightkit.backends import cuda as cuda_backend
from weightkit.backends.cuda import memoryformer as cuda_memoryformer
from weightkit.ops import int4, int8
from weightkit.ops.dictionary import dict_bitmask_matmul
from weightkit.ops.memoryformer import memory_lookup, memory_lookup_grads, memory_lookup_reference
from weightkit.ops import memoryformer as memory_ops

if native.CUDA is None or native.CUDA.archs() != "cudasim":
    pytest.skip("runs on cudasim only (tests/test_cudasim.py)", allow_module_level=True)

TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
       torch.float16: dict(rtol=2e-3, atol=2e-3)}
SMS = 132


def _with_block_order(seed, fn):
    """fn() with cudasim's block and thread orders seeded by ``seed`` (read at each launch)."""
    previous = os.environ.get("CUDASIM_SEED")
    os.environ["CUDASIM_SEED"] = str(seed)
    try:
        return fn()
    finally:
        if previous is None:
            del os.environ["CUDASIM_SEED"]
        else:
            os.environ["CUDASIM_SEED"] = previous


def _memory_inputs(n, k, tau, d_out, dtype):
    x = torch.randn(n, k * tau).to(dtype)
    tables = (torch.randn(k, 2 ** tau, d_out) * 0.1).to(dtype)
    return x, tables


def _ref64(x, tables, t, grad=None):
    x64, t64 = x.double().requires_grad_(True), tables.double().requires_grad_(True)
    y = memory_lookup_reference(x64, t64, t)
    return y.detach() if grad is None else torch.autograd.grad(y, (x64, t64), grad.double())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [1, 2, 3, 6])
@pytest.mark.parametrize("d_out", [40, 37])
def test_memory_forward_split_tables(n, d_out, dtype):
    x, tables = _memory_inputs(n, 64, 4, d_out, dtype)
    tb, splits, _ = cuda_memoryformer.forward_plan(n, 64, d_out, tables.element_size(), SMS)
    assert splits > 1 and tb == {1: 1, 2: 2}.get(n, 4), (tb, splits)
    with use_backend("cuda"):
        y = _with_block_order(1, lambda: memory_lookup(x, tables, 1.5))
        y2 = _with_block_order(2, lambda: memory_lookup(x, tables, 1.5))
    assert y.dtype == dtype
    torch.testing.assert_close(y.double(), _ref64(x, tables, 1.5), **TOL[dtype])
    assert torch.equal(y, y2), "the split sums depend on the block order"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,k,tau,d_out", [(200, 5, 4, 24), (33, 9, 3, 130), (7, 2, 11, 8)])
def test_memory_backward_sorts_and_table_grads(n, k, tau, d_out, dtype):
    x, tables = _memory_inputs(n, k, tau, d_out, dtype)
    g = torch.randn(n, d_out).to(dtype)
    gx64, gt64 = _ref64(x, tables, 1.5, g)
    previous = memory_ops.set_table_grad_mode("atomics")
    try:
        with use_backend("cuda"):
            atomics = memory_lookup_grads(g, x, tables, 1.5)
            memory_ops.set_table_grad_mode("segments")
            segments = memory_lookup_grads(g, x, tables, 1.5)
            det = [_with_block_order(s, lambda: memory_lookup_grads(g, x, tables, 1.5, deterministic=True))
                   for s in (1, 2)]
    finally:
        memory_ops.set_table_grad_mode(previous)
    for gx, gt in (atomics, segments, det[0]):
        torch.testing.assert_close(gx.double(), gx64, **TOL[dtype])
        torch.testing.assert_close(gt.double(), gt64, **TOL[dtype])
    assert torch.equal(det[0][0], det[1][0]) and torch.equal(det[0][1], det[1][1])
    assert torch.equal(segments[1], det[0][1]), "segments and deterministic are the same kernels"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,k,s,d_out", [(3, 1100, 950, 20), (2, 300, 200, 3)])  # 950: 2 passes in fp32 and bf16
def test_dictionary_many_nonzeros_per_column(n, k, s, d_out, dtype):
    z, values, bitmask, offsets = bitmask_inputs(n, k, s, d_out, dtype)
    assert offsets.dtype == (torch.uint8 if s <= 255 else torch.int16)
    g = torch.randn(n, d_out).to(dtype)
    y64 = bitmask_ref64(z, values, bitmask)
    gz64, gv64 = bitmask_ref64(z, values, bitmask, g)
    with use_backend("cuda"):
        y = dict_bitmask_matmul(z, values, bitmask, offsets)
        zr, vr = z.clone().requires_grad_(True), values.clone().requires_grad_(True)
        gz, gv = torch.autograd.grad(dict_bitmask_matmul(zr, vr, bitmask, offsets), (zr, vr), g)
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(y.double(), y64, rtol=tol, atol=tol * k ** 0.5)
    torch.testing.assert_close(gz.double(), gz64, rtol=tol, atol=tol * d_out ** 0.5)
    torch.testing.assert_close(gv.double(), gv64, rtol=tol, atol=tol * n ** 0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("in_f,group", [(48, 24), (40, 8), (64, 64)])
def test_int8_dequantize_paths(in_f, group, dtype):
    w = torch.randn(24, in_f)
    scale = int8.absmax_scale(w, group)
    w_q = int8.stochastic_round_int8(w, scale, group, seed=5)
    w64 = int8.dequantize_int8(w_q, scale, group).double()
    for transpose in (False, True):
        x = torch.randn(5, 24 if transpose else in_f).to(dtype)
        with use_backend("cuda"):
            y = int8.int8_matmul(x, w_q, scale, group, transpose)
        assert_quantized_matmul_contract(y, x, w64, transpose, f"transpose={transpose}")


def test_entry_point_refuses_a_bad_token_block():
    x, tables = _memory_inputs(2, 8, 4, 16, torch.float32)
    y = torch.empty(2, 16)
    code = native.CUDA.memory_lookup_forward(x.data_ptr(), 0, tables.data_ptr(), 0, y.data_ptr(), 0, 0, 2, 8, 16, 16,
                                             4, 1.5, 3, 1, 0, 0)
    assert native.cuda_error_string(code) == "invalid argument"


def _int8_weight(out_f, in_f, group):
    w = torch.randn(out_f, in_f)
    scale = int8.absmax_scale(w, group)
    q = int8.stochastic_round_int8(w, scale, group, seed=11)
    return q, scale, int8.dequantize_int8(q, scale, group).double()


def _int4_weight(out_f, in_f, group):
    packed, scale, zero = int4.quantize_int4(torch.randn(out_f, in_f), group)
    return packed, scale, zero, int4.dequantize_int4(packed, scale, zero, group, (out_f, in_f)).double()


GEMV_CASES = ([(tokens, rows, torch.bfloat16) for tokens in (1, 2, 3, 5, 8) for rows in (1, 2, 4)]
              + [(5, 2, torch.float32), (5, 2, torch.float16)])


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("tokens,rows_per_warp,dtype", GEMV_CASES)
def test_gemv(fmt, tokens, rows_per_warp, dtype):
    """Every (format, token block, rows per warp) instantiation in bf16, and fp32 / fp16 x once; 75 rows: the last
    block partly empty; in_f 2304: x staged in three chunks (1024, 1024, 256); int4 groups of 64 over the flat index
    (a row holds 36)."""
    out_f, in_f = 75, 2304
    x = torch.randn(tokens, in_f).to(dtype)
    y = torch.full((tokens, out_f), float("nan")).to(dtype)
    code = native.FLOAT_CODES[dtype]
    if fmt == "int8":
        q, scale, w64 = _int8_weight(out_f, in_f, 128)
        status = native.CUDA.int8_gemv(x.data_ptr(), code, q.data_ptr(), scale.data_ptr(), y.data_ptr(), tokens,
                                       out_f, in_f, 128, rows_per_warp, 0, 0)
    else:
        packed, scale, zero, w64 = _int4_weight(out_f, in_f, 64)
        status = native.CUDA.int4_gemv(x.data_ptr(), code, packed.data_ptr(), scale.data_ptr(), zero.data_ptr(),
                                       y.data_ptr(), tokens, out_f, in_f, 64, rows_per_warp, 0, 0)
    assert status == 0, native.cuda_error_string(status)
    assert_quantized_matmul_contract(y, x, w64, False, f"{fmt}, {tokens} tokens, {rows_per_warp} rows a warp")


def test_gemv_plan_and_refusals():
    assert [cuda_backend.gemv_rows_per_warp(n, SMS) for n in (4096, 8192, 11008, 100)] == [1, 2, 4, 1]
    q, scale, _ = _int8_weight(16, 64, 16)
    x, y = torch.randn(9, 64), torch.empty(9, 16)

    def gemv(tokens=1, in_f=64, group=16, rows=1, q_ptr=q.data_ptr()):
        return native.cuda_error_string(native.CUDA.int8_gemv(x.data_ptr(), 0, q_ptr, scale.data_ptr(), y.data_ptr(),
                                                              tokens, 16, in_f, group, rows, 0, 0))

    assert gemv() == "no error"
    refused = (dict(tokens=9), dict(tokens=0), dict(in_f=56), dict(group=8), dict(rows=3), dict(q_ptr=q.data_ptr() + 1))
    for bad in refused:
        assert gemv(**bad) == "invalid argument", bad
    packed, scale4, zero, _ = _int4_weight(16, 64, 32)
    for bad in (dict(tokens=9), dict(in_f=48), dict(group=16), dict(q_ptr=packed.data_ptr() + 1)):
        args = {**dict(tokens=1, in_f=64, group=32, q_ptr=packed.data_ptr()), **bad}
        status = native.CUDA.int4_gemv(x.data_ptr(), 0, args["q_ptr"], scale4.data_ptr(), zero.data_ptr(), y.data_ptr(),
                                       args["tokens"], 16, args["in_f"], args["group"], 1, 0, 0)
        assert native.cuda_error_string(status) == "invalid argument", bad
    # through the ops: up to 8 tokens the GEMV, 9 the dequantize + matmul path, all within the contract
    q, scale, w64 = _int8_weight(40, 96, 32)
    packed, scale4, zero, w64_4 = _int4_weight(40, 96, 32)
    for tokens in (1, 8, 9):
        xt = torch.randn(tokens, 96).to(torch.bfloat16)
        with use_backend("cuda"):
            y = int8.int8_matmul(xt, q, scale, 32)
            y4 = int4.int4_matmul(xt, packed, scale4, zero, 32, (40, 96))
        assert_quantized_matmul_contract(y, xt, w64, False, f"int8, {tokens} tokens")
        assert_quantized_matmul_contract(y4, xt, w64_4, False, f"int4, {tokens} tokens")
