"""CPU emulations of the INT8 / INT4 CUDA kernels and their host launchers (csrc/cuda/int8.cu, int4.cu); the kernels'
own code runs on the CPU in tests/test_cudasim.py (cudasim), and these ports add the write counts. Each port follows
its kernel line by line (threads of a grid-stride loop, lanes of a warp, Philox blocks, the host's choice between the
16-byte vector kernel and the scalar one) and counts every write, so the tests check what a GPU run would: each
output element written once, every vector access inside its buffer and 16-byte aligned, and the result bit for bit
the reference's (weightkit/ops/int8.py, int4.py).
tests/ops/test_cuda_index_emulation.py does the same for dictionary.cu and memoryformer.cu.

* stochastic_round_int8_cuda_kernel: one thread per Philox block of the stream, its group index divided once and
  stepped lane by lane (offsets not a multiple of 4, groups shorter than a block);
* int8_sr_update_cuda_kernel: one warp per group, the aligned path (4 elements per lane, one Philox block) and the
  unaligned one (one Philox block per element);
* dequantize_int8 / dequantize_int4: the host's vector test and the kernels' index arithmetic, on blocks of rows
  and columns as dequant_matmul asks for them, and the plan at the benchmark shapes (the vector kernels taken).
"""

import numpy as np
import pytest
import torch

from weightkit.ops import rng
from weightkit.ops.int4 import dequantize_int4_reference, quantize_int4
from weightkit.ops.int8 import int8_sr_update_reference, stochastic_round_int8_reference

F32 = np.float32
K_THREADS = 256  # common.cuh: kThreads


def _blocks_for(n, cap=65535 * 8):
    """common.cuh's blocks_for: the grid of a grid-stride loop over n items."""
    return max(1, min((n + K_THREADS - 1) // K_THREADS, cap))


def _philox(blocks, seed):
    """(len(blocks), 4) uint32 Philox outputs of the counters ``blocks``."""
    out = rng.philox4x32(torch.tensor(blocks, dtype=torch.int64), seed)
    return torch.stack(out, dim=1).numpy().astype(np.uint64)


def _uniform(bits):
    return F32(int(bits) >> 8) * F32(1.0 / 16777216.0)


def _sr(w, inv, bits):
    """floorf(w * inv + u) clamped to [-128, 127], each operation rounded to fp32 (--fmad=false)."""
    return int(min(max(np.floor(F32(F32(w * inv) + _uniform(bits))), F32(-128)), F32(127)))


def emulate_stochastic_round_int8(x, scale, group, seed, offset):
    """stochastic_round_int8_cuda_kernel with its host's block count; returns (q, writes per element)."""
    n = x.size
    first, last = offset, offset + n
    blocks = ((last + 3) >> 2) - (first >> 2)
    assert 0 < _blocks_for(blocks, 65535 * 16) <= 2 ** 31 - 1
    r = _philox(list(range(first >> 2, (first >> 2) + blocks)), seed)
    q = np.zeros(n, dtype=np.int64)
    writes = np.zeros(n, dtype=np.int64)
    for t in range(blocks):  # one thread per Philox block
        b = (first >> 2) + t
        g0 = max(first, 4 * b)
        gi, rem = divmod(g0 - first, group)
        inv = F32(1) / scale[gi]
        for lane in range(4):
            g = 4 * b + lane
            if g < first or g >= last:
                continue
            if rem == group:
                gi, rem = gi + 1, 0
                inv = F32(1) / scale[gi]
            i = g - first
            assert i // group == gi, "the stepped group index left the element's group"
            q[i] = _sr(x[i], inv, r[t, lane])
            writes[i] += 1
            rem += 1
    return q, writes


@pytest.mark.parametrize("group", [1, 2, 3, 5, 8, 64])
@pytest.mark.parametrize("offset", [0, 1, 2, 3, 4, 7, 2 ** 40 + 5])
def test_stochastic_round_int8_kernel_emulated(group, offset):
    n = group * max(1, 70 // group)
    gen = torch.Generator().manual_seed(group * 100 + offset % 97)
    x = torch.randn(n, generator=gen) * 3
    scale = torch.rand(n // group, generator=gen) * 0.05 + 0.01
    q, writes = emulate_stochastic_round_int8(x.numpy(), scale.numpy(), group, 1234, offset)
    assert (writes == 1).all()
    np.testing.assert_array_equal(q, stochastic_round_int8_reference(x, scale, group, 1234, offset).numpy())


def emulate_int8_sr_update(q, scale, delta, gs, decay, seed, offset):
    """int8_sr_update_cuda_kernel (one warp per group) with its host's grid; in place on q and scale, returns the
    writes per element of q."""
    groups = scale.size
    grid = (groups * 32 + K_THREADS - 1) // K_THREADS
    assert grid * K_THREADS // 32 >= groups  # every group has its warp
    writes = np.zeros(q.size, dtype=np.int64)
    decay = F32(decay)
    for g in range(groups):
        qg, dg, s = q[g * gs:(g + 1) * gs], delta[g * gs:(g + 1) * gs], scale[g]

        def w_at(i):
            return F32(F32(F32(qg[i]) * s + dg[i]) * decay)

        amax = max(abs(w_at(i)) for i in range(gs))  # the lanes' maxima, then the shuffle reduction: one max
        ns = max(F32(F32(amax) / F32(127)), np.finfo(np.float32).tiny)
        inv = F32(1) / ns
        base = offset + g * gs
        new = qg.copy()  # every lane reads its own elements before writing them
        if base % 4 == 0 and gs % 4 == 0:
            for lane in range(32):
                for i in range(4 * lane, gs, 128):
                    r = _philox([(base + i) >> 2], seed)[0]
                    for j in range(4):
                        assert i + j < gs
                        new[i + j] = _sr(w_at(i + j), inv, r[j])
                        writes[g * gs + i + j] += 1
        else:
            for lane in range(32):
                for i in range(lane, gs, 32):
                    pos = base + i
                    new[i] = _sr(w_at(i), inv, _philox([pos >> 2], seed)[0][pos & 3])
                    writes[g * gs + i] += 1
        qg[:] = new
        scale[g] = ns
    return writes


@pytest.mark.parametrize("gs,offset", [(4, 0), (8, 4), (132, 8), (256, 0), (8, 2), (6, 0), (3, 1), (40, 7)])
@pytest.mark.parametrize("delta_dtype", [torch.float32, torch.bfloat16])
def test_int8_sr_update_kernel_emulated(gs, offset, delta_dtype):
    """Both paths of the kernel (aligned: offset and group multiples of 4, with groups longer than a warp's 128
    elements) against the reference, bit for bit."""
    groups = 3
    gen = torch.Generator().manual_seed(gs + offset)
    w_q = torch.randint(-128, 128, (groups * gs,), generator=gen, dtype=torch.int8)
    scale = torch.rand(groups, generator=gen) * 0.02 + 0.01
    delta = (torch.randn(groups * gs, generator=gen) * 0.1).to(delta_dtype)
    q, s = w_q.numpy().astype(np.int64), scale.numpy().copy()
    writes = emulate_int8_sr_update(q, s, delta.to(torch.float32).numpy(), gs, 0.99, 77, offset)
    assert (writes == 1).all()
    int8_sr_update_reference(w_q, scale, delta, gs, 0.99, 77, offset)
    np.testing.assert_array_equal(s, scale.numpy())
    np.testing.assert_array_equal(q, w_q.numpy())


# -- the dequantizations of the "dequantize to x's dtype + cuBLAS" matmuls ---------------------------------------

def dequant_plan(fmt, n_cols, group, c0, cols, src_offset=0, out_offset=0):
    """The host's choice (wk_cuda_dequantize_int8 / _int4): (values per vector, one scale per vector) of the vector
    kernel, or None for the scalar one. src_offset / out_offset: the pointers' byte offsets from a 16-byte boundary."""
    per = 16 if fmt == "int8" else 32
    if n_cols % per == 0 and c0 % per == 0 and cols % per == 0 and src_offset % 16 == 0 and out_offset % 16 == 0:
        return per, group % per == 0
    return None


def emulate_dequant(fmt, w_src, w, n_cols, group, r0, rows, c0, cols, src_offset=0, out_offset=0, out_bytes=4):
    """The kernel the host picks, on the flat weight: w (the dequantized flat weight) gives the values; checks every
    vector's alignment and bounds. Returns (out, writes)."""
    n = rows * cols
    out, writes = np.full(n, np.nan), np.zeros(n, dtype=np.int64)
    plan = dequant_plan(fmt, n_cols, group, c0, cols, src_offset, out_offset)
    if plan is None:
        t = np.arange(n)
        i = t // cols
        e = (r0 + i) * n_cols + c0 + (t - i * cols)
        assert e.max() < w.size
        out[t] = w[e]
        np.add.at(writes, t, 1)
        return out, writes
    per, one_group = plan
    vectors = n // per
    assert vectors * per == n and 0 < _blocks_for(vectors)
    v = np.arange(vectors)
    per_row = cols // per
    i = v // per_row
    j = (v - i * per_row) * per
    e = (r0 + i) * n_cols + c0 + j
    src_byte = e if fmt == "int8" else e // 2  # the uint4 load: 16 bytes = 16 int8 / 32 int4 values
    assert (e % per == 0).all() and ((src_byte + src_offset) % 16 == 0).all() and (src_byte + 16 <= w_src.nbytes).all()
    dst = i * cols + j
    assert (((dst * out_bytes) + out_offset) % 16 == 0).all() and (dst + per <= n).all()
    for k in range(per):
        if one_group:
            assert ((e + k) // group == e // group).all()
        out[dst + k] = w[e + k]
        np.add.at(writes, dst + k, 1)
    return out, writes


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("n_rows,n_cols,group", [(40, 96, 32), (24, 64, 64), (20, 96, 48), (10, 50, 10),
                                                 (12, 128, 16), (6, 160, 160)])
def test_dequant_kernels_emulated(fmt, n_rows, n_cols, group):
    """Every block dequant_matmul can ask for (rows, columns, tails; transpose or not), through the kernel the
    host picks (vector or scalar; misaligned pointers take the scalar one): each output element written once, equal
    to the reference's dequantization."""
    gen = torch.Generator().manual_seed(n_rows * n_cols + group)
    if fmt == "int8":
        q = torch.randint(-128, 128, (n_rows * n_cols,), generator=gen, dtype=torch.int8)
        scale = torch.rand(q.numel() // group, generator=gen)
        src = q.numpy()
        w = (q.float().view(-1, group) * scale.view(-1, 1)).reshape(-1).numpy()
    else:
        packed, scale, zero = quantize_int4(torch.randn(n_rows * n_cols, generator=gen), group)
        src = packed.numpy()
        w = dequantize_int4_reference(packed, scale, zero, group).numpy()
    blocks = [(0, n_rows, 0, n_cols), (3, n_rows - 5, 0, n_cols), (0, n_rows, 32, n_cols - 32),
              (0, n_rows, 0, 16), (1, 1, 0, n_cols)]
    for r0, rows, c0, cols in blocks:
        if cols <= 0 or c0 + cols > n_cols:
            continue
        expected = w.reshape(n_rows, n_cols)[r0:r0 + rows, c0:c0 + cols].reshape(-1)
        for src_offset, out_offset in ((0, 0), (1, 0), (0, 8)):
            out, writes = emulate_dequant(fmt, src, w, n_cols, group, r0, rows, c0, cols, src_offset, out_offset)
            assert (writes == 1).all()
            np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("shape", [(8192, 8192), (4096, 11008), (11008, 4096), (128256, 4096)])
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dequant_plan_at_benchmark_shapes_takes_the_vector_kernels(shape, transpose, dtype):
    """The blocks dequant_matmul asks for at the benchmark shapes (and a vocabulary head, which takes several):
    every block goes to the 16-byte vector kernels of both formats (a fresh torch buffer is 16-byte aligned), with
    one scale per vector at the groups used (int8 g128, int4 g64), a grid within the launch limits, and flat
    indices that fit int64 arithmetic (the kernels' type) but not always int32."""
    from weightkit.backends._blocked import dequant_matmul

    rows, cols = shape
    calls = []
    x = torch.empty((4, rows if transpose else cols), dtype=dtype, device="meta")
    dequant_matmul(x, rows, cols, transpose, lambda dst, r0, nr, c0, nc: calls.append((r0, nr, c0, nc)))
    assert calls
    for r0, nr, c0, nc in calls:
        for fmt, group in (("int8", 128), ("int4", 64)):
            plan = dequant_plan(fmt, cols, group, c0, nc)
            assert plan is not None and plan[1], (fmt, r0, nr, c0, nc)
            assert 0 < _blocks_for(nr * nc // plan[0]) <= 65535 * 8
