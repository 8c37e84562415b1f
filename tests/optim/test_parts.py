"""The parts of the GaLore step, each on its own (weightkit.optim.basis, .moments, .weights, .refresh), their
composition through GaLoreParts, and the import graph of weightkit.optim (no circle, no import running back up).
On every device (CPU and, when present, CUDA)."""

import ast
import os

import pytest
import torch
from torch import nn

from tests.conftest import DEVICES, usable_backends
from weightkit import use_backend
from weightkit.nn import Int8Linear
from weightkit.ops.galore import galore_adam_update_reference
from weightkit.ops.int8 import dequantize_int8
from weightkit.optim import GaLoreAdamW, GaLoreParts, LayerwiseGaLore, QGaLoreAdamW8bit
from weightkit.optim import moments as moments_module
from weightkit.optim.basis import FloatBasis, Int4Basis, PackedInt4
from weightkit.optim.moments import BlockwiseMoments8bit, FloatMoments
from weightkit.optim.refresh import FixedRefresh, LazyRefresh
from weightkit.optim.weights import FloatWeight, Int8SRWeight, LowRankUpdate


def randn(*shape, seed=0, device="cpu"):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(device)


def orthonormal(m, r, device, seed=0):
    return torch.linalg.qr(randn(m, r, seed=seed))[0].contiguous().to(device)


# -- (a) basis storage -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_float_basis_float32_is_stored_as_is_and_bfloat16_rounds_once(device):
    u, vh = orthonormal(24, 4, device), orthonormal(16, 4, device, seed=1).T.contiguous()
    store = FloatBasis()
    entries = {}
    store.store(entries, u, vh, {"proj_dtype": None})
    loaded = store.load(entries, {})
    assert loaded[0].data_ptr() == entries["ortho"].data_ptr()  # float32: loading copies nothing
    assert torch.equal(loaded[0], u) and torch.equal(loaded[1], vh) and store.has(entries)
    half = {}
    store.store(half, u, None, {"proj_dtype": "bfloat16"})
    assert half["ortho"].dtype == torch.bfloat16 and "ortho_right" not in half
    back = store.load(half, {})[0]
    assert back.dtype == torch.float32
    torch.testing.assert_close(back, u, rtol=2**-8, atol=0)  # one bf16 rounding: 8 bits of mantissa
    with pytest.raises(ValueError, match="proj_dtype='int8'"):
        store.store({}, u, None, {"proj_dtype": "int8"})
    with pytest.raises(ValueError, match=r"saved ortho has shape \(24, 4\), expected \(4, 24\)"):
        store.validate("p", entries, {"ortho": (4, 24), "ortho_right": (4, 16)}, {})


@pytest.mark.parametrize("device", DEVICES)
def test_int4_basis_round_trip_error_and_validation(device):
    p = orthonormal(64, 8, device)
    store = Int4Basis(proj_group_size=16)
    group = {"proj_group_size": 16}
    entries = {}
    store.store(entries, p, None, group)
    assert entries["ortho_q"].dtype == torch.uint8 and entries["ortho_q"].numel() == 64 * 8 // 2
    assert entries["ortho_shape"].device.type == "cpu" and entries["ortho_q"].device == p.device
    packed, right = store.load(entries, group)
    assert right is None and isinstance(packed, PackedInt4) and packed.shape == (64, 8)  # no dequantized copy
    back = store.dense((packed, right))[0]
    assert back.shape == p.shape and back.dtype == torch.float32
    # the projection reads the packed basis (int4_matmul): the float32 projection with the dequantized one
    grad = torch.randn(64, 24, device=device)
    torch.testing.assert_close(store.project(grad, "left", (packed, None)), back.T @ grad, rtol=1e-5, atol=1e-5)
    packed_right = PackedInt4(packed.q, packed.scale, packed.zero, 16, (8, 64))
    grad = torch.randn(24, 64, device=device)
    torch.testing.assert_close(store.project(grad, "right", (packed_right, None)), grad @ back.reshape(8, 64).T,
                               rtol=1e-5, atol=1e-5)
    # 16 levels over each group's [min, max] (widened to include 0): at most half a step off per element
    g = p.reshape(-1, 16)
    step = (g.amax(1).clamp_min(0) - g.amin(1).clamp_max(0)) / 15
    err = (back - p).abs().reshape(-1, 16).amax(1)
    assert bool((err <= step / 2 + 1e-6).all())
    store.validate("p", entries, {"ortho": (64, 8)}, group)
    with pytest.raises(ValueError, match=r"saved ortho_shape \(64, 8\), expected \(8, 64\)"):
        store.validate("p", entries, {"ortho": (8, 64)}, group)
    bad = dict(entries, ortho_scale=entries["ortho_scale"][:-1])
    with pytest.raises(ValueError, match="ortho_scale must hold 32 values"):
        store.validate("p", bad, {"ortho": (64, 8)}, group)
    with pytest.raises(ValueError, match="one-sided"):
        store.store({}, p, p.T.contiguous(), group)
    with pytest.raises(ValueError, match="proj_type='full' is not supported"):
        store.check_group({"proj_group_size": 16, "proj_type": "full"})
    with pytest.raises(ValueError, match="proj_group_size must be an even int"):
        store.check_group({"proj_group_size": 7, "proj_type": "std"})


# -- (b) moment storage ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_float_moments_are_updated_in_place(device):
    state = {}
    moments = FloatMoments()
    moments.init(state, torch.empty(3, 5, device=device))
    m, v = moments.load(state)
    assert m is state["exp_avg"] and v is state["exp_avg_sq"] and m.dtype == torch.float32 and not m.any()
    m.add_(1)
    moments.store(state, m, v)
    assert bool((state["exp_avg"] == 1).all())
    with pytest.raises(ValueError, match=r"saved exp_avg has shape \(3, 5\), expected \(5, 3\)"):
        moments.validate("p", state, (5, 3))


@pytest.mark.parametrize("device", DEVICES)
def test_8bit_moments_quantize_above_the_threshold_and_round_trip(device):
    pytest.importorskip("bitsandbytes")
    moments = BlockwiseMoments8bit(min_8bit_size=100)
    small, big = {}, {}
    moments.init(small, torch.empty(9, 10, device=device))  # 90 < 100: float32
    moments.init(big, torch.empty(30, 20, device=device))
    assert "exp_avg" in small and "exp_avg_q" not in small
    assert big["exp_avg_q"].dtype == torch.uint8 and big["moment_shape"].device.type == "cpu"
    assert big["exp_avg_absmax"].numel() == 3  # 600 values in blocks of 256
    for key, signed in (("exp_avg", True), ("exp_avg_sq", False)):  # zeros, quantized (one block's repeated)
        q, absmax = moments.quantize(torch.zeros(30, 20, device=device), signed)
        assert torch.equal(big[key + "_q"], q) and torch.equal(big[key + "_absmax"], absmax)
        assert big[key + "_q"].is_contiguous() and big[key + "_q"].shape == (30, 20)
    m, v = moments.load(big)
    assert m.shape == (30, 20) and m.dtype == torch.float32 and not m.any() and not v.any()
    want_m, want_v = randn(30, 20, seed=1, device=device), randn(30, 20, seed=2, device=device).abs()
    m.copy_(want_m), v.copy_(want_v)
    moments.store(big, m, v)
    got_m, got_v = moments.load(big)
    # error at most 1/64 of the block's absmax (measured: 0.0070 signed, 0.0035 unsigned, on CPU)
    for got, want in ((got_m, want_m), (got_v, want_v)):
        blocks = want.reshape(-1)
        absmax = torch.stack([blocks[i:i + 256].abs().max() for i in range(0, 600, 256)])
        err = (got - want).abs().reshape(-1)
        bound = torch.repeat_interleave(absmax, torch.tensor([256, 256, 88]).to(device)) / 64
        assert bool((err <= bound).all())
    moments.validate("p", big, (30, 20))
    with pytest.raises(ValueError, match="moment_shape"):
        moments.validate("p", big, (20, 30))
    with pytest.raises(ValueError, match="min_8bit_size must be an int"):
        BlockwiseMoments8bit(min_8bit_size=-1)


class LargestFloat32(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the largest float32 tensor an op allocates (views and in-place results, whose storage is an
    input's, are not new), inside weightkit's own ops too: their kernel (the backend's torch code) runs with the
    mode on, so what a backend converts or allocates is seen."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "weightkit":  # past the Python key to the device's kernel, this mode on inside it
            device = next(t.device for t in torch.utils._pytree.tree_leaves(args) if isinstance(t, torch.Tensor))
            key = torch._C.DispatchKey.CUDA if device.type == "cuda" else torch._C.DispatchKey.CPU
            with self:
                out = func.redispatch(torch._C.DispatchKeySet(key), *args, **(kwargs or {}))
        else:
            out = func(*args, **(kwargs or {}))
        leaves = torch.utils._pytree.tree_leaves((args, kwargs))
        inputs = {t.untyped_storage().data_ptr() for t in leaves if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if (isinstance(t, torch.Tensor) and t.dtype == torch.float32
                    and t.untyped_storage().data_ptr() not in inputs):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["float", "int4"])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_large_16bit_gradient_is_projected_by_blocks(device, kind, side, dtype, monkeypatch):
    """A bf16/fp16 gradient of more than _blocked.FLOAT32_BLOCK values goes to float32 a block at a time (columns for a
    left basis, rows for a right one): no float32 copy of it exists whole (at LLaMA-7B's 4096 x 11008 that copy,
    172 MiB, was the largest temporary of a Q-GaLore step), and the projection is the whole conversion's (the same
    sums, by column / row). On a GPU where TF32 is not allowed no float32 copy is made at all (its 16-bit values,
    or their two bf16 parts, meet the basis' bf16 parts on tensor cores; Triton reads them in its tiles)."""
    from weightkit.backends import _blocked
    from weightkit.ops.int4 import quantize_int4
    m, n, r = 48, 40, 8
    dev = torch.device(device)
    no_copy = dev.type == "cuda" and _blocked.split_products_apply(dev)
    grad = randn(m, n, seed=3, device=device).to(dtype)
    p = orthonormal(m, r, device) if side == "left" else orthonormal(n, r, device, seed=1).T.contiguous()
    if kind == "float":
        store, basis = FloatBasis, (p, None)
    else:
        store, basis = Int4Basis, (PackedInt4(*quantize_int4(p, 16), 16, tuple(p.shape)), None)
    with LargestFloat32() as probe:
        whole = store.project(grad, side, basis)
    if no_copy:
        assert probe.largest < m * n, probe.largest
    else:
        assert probe.largest == m * n  # below FLOAT32_BLOCK: converted whole, as before
    monkeypatch.setattr(_blocked, "FLOAT32_BLOCK", 200)
    with LargestFloat32() as probe:
        blocks = store.project(grad, side, basis)
    assert blocks.shape == whole.shape == ((r, n) if side == "left" else (m, r)) and blocks.dtype == torch.float32
    # the blocks' copies, the result itself, and (INT4) the basis' float32 values, dequantized by the cpu backend; on
    # a GPU without TF32 the products of the basis' three parts side by side, 3x the result's width
    own = whole.numel() if kind == "float" else max(whole.numel(), p.numel())
    own = max(own, 3 * whole.numel()) if no_copy else own
    assert probe.largest <= max(200, own), probe.largest
    torch.testing.assert_close(blocks, whole, rtol=1e-6, atol=1e-6)
    f32 = grad.to(torch.float32)  # a float32 gradient: no copy, whatever its size
    with LargestFloat32() as probe:
        store.project(f32, side, basis)
    assert probe.largest <= own


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_float_basis_projects_a_gradient_by_bf16_parts(device, side, dtype, monkeypatch):
    """A float32 basis and a gradient with TF32 not allowed (torch's default matmul setting): on a GPU the basis goes
    in three bf16 parts (basis.split3_applies), three exact products with float32 results (an fp16 G in two bf16
    parts too, split a block at a time: five; a float32 G in three: six, where the projection is large enough,
    basis.SPLIT_FLOAT32_MIN_RANK and SPLIT_FLOAT32_MIN_FLOPS, lowered here), no float32 copy of a 16-bit G (of a
    float32 one, no float32 temporary beyond a block of it): within 1.5x the strict float32 projection's error
    against float64, ~10^3 times better than the basis rounded to bf16 (galore-torch's bf16 projection). The CPU
    takes the float32 product (split3_applies is False there); the same code is run on it by forcing
    split3_applies, and with G's blocks lowered (several blocks of G: the same values). TF32 allowed, or a float32
    projection below the thresholds: the float32 product, as before."""
    from weightkit.backend import allow_tf32
    from weightkit.backends import _blocked
    from weightkit.backends._blocked import float32_mm_of_bf16
    from weightkit.optim import basis as basis_module

    if not float32_mm_of_bf16(torch.device(device)):
        pytest.skip("this torch's CUDA mm has no float32 output for bf16 operands (the conversion then runs)")
    m, n, r = (96, 400, 16) if side == "left" else (400, 96, 16)
    grad = randn(m, n, seed=7, device=device).to(dtype)
    p = orthonormal(m, r, device, seed=3) if side == "left" else orthonormal(n, r, device, seed=3).T.contiguous()
    p64, g64 = p.double().cpu(), grad.double().cpu()
    ref = p64.T @ g64 if side == "left" else g64 @ p64.T
    rel = lambda t: float((t.double().cpu() - ref).norm() / ref.norm())  # noqa: E731
    with allow_tf32(False):
        if dtype == torch.float32:
            assert not basis_module.split3_applies(grad, r)  # r and 2 m n r below the thresholds
            monkeypatch.setattr(basis_module, "SPLIT_FLOAT32_MIN_FLOPS", 2 * m * n * r)
            assert not basis_module.split3_applies(grad, r)
            monkeypatch.setattr(basis_module, "SPLIT_FLOAT32_MIN_RANK", r)
            assert not basis_module.split3_applies(grad, r - 1)
        applies = basis_module.split3_applies(grad, r)
        assert applies == (device == "cuda"), applies
        if not applies:
            monkeypatch.setattr(basis_module, "split3_applies", lambda g, rank: True)
        before = p.clone()
        with LargestFloat32() as probe:
            out = FloatBasis.project(grad, side, (p, None))
        assert torch.equal(p, before)  # the split works on a copy of the basis
        g32 = grad.float()
        fp32 = rel(p.T @ g32 if side == "left" else g32 @ p.T)
    rounded = rel(p.bfloat16().float().T @ g32 if side == "left" else g32 @ p.bfloat16().float().T)
    assert out.dtype == torch.float32 and tuple(out.shape) == tuple(ref.shape)
    print(f"relative error: split {rel(out):.3g}, float32 {fp32:.3g}, basis rounded to bf16 {rounded:.3g}")
    assert rel(out) <= 1.5 * fp32 and rel(out) * 100 < rounded, (rel(out), fp32, rounded)
    if device == "cuda" and dtype != torch.float32:
        # (its three products as one GEMM, the result three times as wide as R: still far below G)
        assert probe.largest <= 3 * max(out.numel(), p.numel()) < grad.numel(), probe.largest
    if device == "cuda":
        with allow_tf32(True):
            assert not basis_module.split3_applies(grad, r)
    monkeypatch.setattr(_blocked, "FLOAT32_BLOCK", 96 * 70)  # G by 70 rows or columns: several blocks
    with allow_tf32(False), LargestFloat32() as probe:
        torch.testing.assert_close(FloatBasis.project(grad, side, (p, None)), out, rtol=1e-6, atol=1e-6)
    if dtype == torch.float32:  # a block's float32 remainder, its products, the result: never G whole (the CPU
        # upcasts a block's three stacked bf16 parts for its product: 3 blocks)
        block = (3 if device == "cpu" else 1) * 96 * 70
        assert probe.largest <= max(block, out.numel()) < grad.numel(), probe.largest


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_split_projection_takes_gs_parts_from_the_bf16_parts_op(device, side, dtype, monkeypatch):
    """A split projection of a float32 or float16 G (basis.split_projection) makes G's parts by the op
    weightkit::bf16_parts, a block of G a call (one Triton or CUDA pass on a GPU, not torch's four): every backend
    of the op gives the projection the same bits."""
    from weightkit.backends import _blocked
    from weightkit.ops import galore as galore_ops
    from weightkit.optim import basis as basis_module

    m, n, r = (96, 400, 16) if side == "left" else (400, 96, 16)
    grad = randn(m, n, seed=11, device=device).to(dtype)
    p = orthonormal(m, r, device, seed=5) if side == "left" else orthonormal(n, r, device, seed=5).T.contiguous()
    monkeypatch.setattr(_blocked, "FLOAT32_BLOCK", 96 * 150)  # three blocks of G
    calls = []
    real = basis_module.bf16_parts
    monkeypatch.setattr(basis_module, "bf16_parts", lambda x, dim: calls.append((x.shape, dim)) or real(x, dim))
    results = {}
    for name in usable_backends(galore_ops._PARTS, device):
        calls.clear()
        with use_backend(name):
            results[name] = basis_module.split_projection(grad, side, p)
        blocks = [(96, 150), (96, 150), (96, 100)]
        assert calls == ([(b, 0) for b in blocks] if side == "left" else [(b[::-1], 1) for b in blocks]), calls
    assert "reference" in results and (device == "cpu" or len(results) >= 2), sorted(results)
    for name, out in results.items():
        assert torch.equal(out, results["reference"]), name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("side", ["left", "right"])
def test_int4_basis_splits_a_float32_gradient_as_the_float_basis(device, side, monkeypatch):
    """Where a float32 gradient is split (basis.split3_applies: a GPU without TF32, the thresholds lowered here; the
    CPU forced), Int4Basis projects it as FloatBasis does with the dequantized basis, bit for bit, and int4_matmul is
    not called: within 1.5x the float32 projection's error against float64. Otherwise int4_matmul, as before."""
    from weightkit.backend import allow_tf32
    from weightkit.backends._blocked import float32_mm_of_bf16
    from weightkit.ops.int4 import quantize_int4
    from weightkit.optim import basis as basis_module

    if not float32_mm_of_bf16(torch.device(device)):
        pytest.skip("this torch's CUDA mm has no float32 output for bf16 operands (no split then)")
    m, n, r = (64, 300, 16) if side == "left" else (300, 64, 16)
    grad = randn(m, n, seed=9, device=device)
    p = orthonormal(m, r, device, seed=4) if side == "left" else orthonormal(n, r, device, seed=4).T.contiguous()
    packed = PackedInt4(*quantize_int4(p, 16), 16, tuple(p.shape))
    dense = packed.dequantize()
    calls = []
    real = basis_module.int4_matmul
    monkeypatch.setattr(basis_module, "int4_matmul", lambda *a, **k: calls.append(1) or real(*a, **k))
    with allow_tf32(False):
        plain = Int4Basis.project(grad, side, (packed, None))
        assert len(calls) == 1  # below the thresholds (or on the CPU): int4_matmul
        monkeypatch.setattr(basis_module, "SPLIT_FLOAT32_MIN_RANK", r)
        monkeypatch.setattr(basis_module, "SPLIT_FLOAT32_MIN_FLOPS", 2 * m * n * r)
        if device != "cuda":
            monkeypatch.setattr(basis_module, "split3_applies", lambda g, rank: True)
        split = Int4Basis.project(grad, side, (packed, None))
        assert len(calls) == 1, calls
        assert torch.equal(split, FloatBasis.project(grad, side, (dense, None)))
    d64, g64 = dense.double().cpu(), grad.double().cpu()
    ref = d64.T @ g64 if side == "left" else g64 @ d64.T
    rel = lambda t: float((t.double().cpu() - ref).norm() / ref.norm())  # noqa: E731
    print(f"relative error: split {rel(split):.3g}, int4_matmul float32 {rel(plain):.3g}")
    assert split.dtype == torch.float32 and rel(split) <= 1.5 * rel(plain) + 1e-9, (rel(split), rel(plain))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("side,group", [("right", 64), ("left", 16), ("left", 64)])
def test_projection_of_a_16bit_gradient_on_triton_makes_no_float32_copy(device, dtype, side, group):
    """Where Triton runs (a GPU; on the CPU the interpreter, with triton forced), the INT4 basis' projection of a bf16
    or fp16 gradient reads the gradient's 16-bit values and stores a float32 result (int4_matmul's out_dtype=float32
    on the triton backend): no float32 copy of the gradient, at least the float32 projection's accuracy. Right
    (G P^T): the basis' integers times the gradient, exact products. Left (P^T G, the transposed kernel): the basis'
    float32 values in three bf16 parts (an fp16 gradient's tile in two: five products); groups of 16 along the rank
    (packed-byte tiles) and of 64 (8 ranks: groups across rows, gathered)."""
    from tests.conftest import usable_backends
    from weightkit.ops import int4
    from weightkit.ops.int4 import quantize_int4

    if "triton" not in usable_backends(int4._MM, device):
        pytest.skip(f"Triton cannot run on {device} here (no GPU, or no TRITON_INTERPRET for CPU tensors)")
    m, n, r = (40, 128, 8) if side == "right" else (72, 40, 16 if group == 16 else 8)
    grad = randn(m, n, seed=5, device=device).to(dtype)
    p = orthonormal(n, r, device, seed=2).T.contiguous() if side == "right" else orthonormal(m, r, device, seed=2)
    packed = PackedInt4(*quantize_int4(p, group), group, tuple(p.shape))
    w = packed.dequantize().double()
    ref = grad.double() @ w.T if side == "right" else w.T @ grad.double()
    f32 = Int4Basis.project(grad, side, (packed, None))  # auto on the CPU: the float32 conversion
    with use_backend("triton"), LargestFloat32() as probe:
        out = Int4Basis.project(grad, side, (packed, None))
    assert probe.largest == ref.numel()  # the result alone: no float32 copy of the gradient
    rel = lambda t: float((t.double() - ref).norm() / ref.norm())  # noqa: E731
    bound = 1.0 if side == "right" else 1.5  # right: exact products, at least the float32 product's accuracy
    assert out.dtype == torch.float32 and rel(out) <= bound * rel(f32) + 1e-9, (rel(out), rel(f32))
    assert rel(out) < 1e-6, rel(out)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cls", ["GaLoreAdamW", "GaLoreAdamW8bit", "QGaLoreAdamW8bit"])
@pytest.mark.parametrize("nonfinite", ["raise", "skip"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_adamw_by_blocks_is_the_whole_update(device, cls, nonfinite, dtype, monkeypatch):
    """A dense parameter (an embedding: outside the GaLore groups) is stepped by blocks of moments.DENSE_BLOCK
    values: no float32 temporary larger than a block (8-bit moments: dequantized and quantized back block by
    block), and the weight and moments are those of the whole-tensor step, bit for bit (blocks of 512 values: two
    whole ones and a partial last one of 1344; the 8-bit ones in quantization blocks of 256). A flagged step
    ('skip' with a NaN gradient) leaves weight, codes and absmax entries as they were."""
    if cls != "GaLoreAdamW":
        pytest.importorskip("bitsandbytes")
    from weightkit import optim

    def run(block):
        if block is not None:
            monkeypatch.setattr(moments_module, "DENSE_BLOCK", block)
        emb = nn.Embedding(42, 32).to(device=device, dtype=dtype)  # 1344 values
        with torch.no_grad():
            emb.weight.copy_(randn(42, 32, seed=1, device=device))
        kw = {} if cls == "GaLoreAdamW" else {"min_8bit_size": 1}
        opt = getattr(optim, cls)([{"params": [emb.weight]}], lr=1e-2, weight_decay=0.1, nonfinite=nonfinite, **kw)
        largest = 0
        for step in range(3):
            emb.weight.grad = randn(42, 32, seed=10 + step, device=device).to(dtype)
            with LargestFloat32() as probe:
                opt.step()
            if step:  # (the first step makes the moments: state, not temporaries)
                largest = max(largest, probe.largest)
        before = {k: v.clone() for k, v in opt.state[emb.weight].items() if isinstance(v, torch.Tensor)}
        weight = emb.weight.detach().clone()
        if nonfinite == "skip":
            emb.weight.grad = randn(42, 32, seed=20, device=device).to(dtype)
            emb.weight.grad[3, 4] = float("nan")
            opt.step()
            assert torch.equal(emb.weight.detach(), weight)
            for k, v in before.items():
                if k != "nonfinite_skips":
                    assert torch.equal(opt.state[emb.weight][k], v), k
        monkeypatch.undo()
        return weight, before, largest

    w_whole, s_whole, largest_whole = run(None)
    w_blocks, s_blocks, largest_blocks = run(512)
    assert largest_whole >= 1344 and largest_blocks <= 512, (largest_whole, largest_blocks)
    assert torch.equal(w_whole, w_blocks)
    assert s_whole.keys() == s_blocks.keys() and (cls == "GaLoreAdamW") == ("exp_avg" in s_whole)
    for k in s_whole:
        assert torch.equal(s_whole[k], s_blocks[k]), k


# -- (c) weights -------------------------------------------------------------------------------------------------------
def update(step=3):
    return LowRankUpdate(beta1=0.9, beta2=0.99, eps=1e-6, step_size=1e-2, scale=0.5, decay=0.99, step=step, seed=11)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("side", ["left", "right"])
def test_float_weight_one_sided_is_the_fused_galore_update(side, device):
    m, n, r = 24, 16, 4
    ortho = orthonormal(m, r, device) if side == "left" else orthonormal(n, r, device).T.contiguous()
    low = randn(*((r, n) if side == "left" else (m, r)), seed=3, device=device)
    w = randn(m, n, seed=4, device=device)
    ms = [randn(*low.shape, seed=5, device=device) * 0.1, randn(*low.shape, seed=6, device=device).abs() * 0.1]
    want_w, want_m, want_v = w.clone(), ms[0].clone(), ms[1].clone()
    u = update()
    with use_backend("reference"):
        FloatWeight().apply_low_rank(w, low, ms[0], ms[1], ortho, None, side, u)
    galore_adam_update_reference(want_w, low, want_m, want_v, ortho, side == "left", u.beta1, u.beta2, u.eps,
                                 u.step_size, u.scale, u.decay)
    assert torch.equal(w, want_w) and torch.equal(ms[0], want_m) and torch.equal(ms[1], want_v)


@pytest.mark.parametrize("device", DEVICES)
def test_float_weight_full_projection(device):
    m, n, r = 12, 10, 3
    u_, vh = orthonormal(m, r, device), orthonormal(n, r, device, seed=1).T.contiguous()
    low, w = randn(r, r, seed=2, device=device), randn(m, n, seed=3, device=device)
    exp_avg, exp_avg_sq = torch.zeros(r, r, device=device), torch.zeros(r, r, device=device)
    u = update(step=1)
    before = w.clone()
    FloatWeight().apply_low_rank(w, low, exp_avg, exp_avg_sq, u_, vh, "full", u)
    direction = (0.1 * low) / ((0.01 * low * low).sqrt() + u.eps)  # first step from zero moments
    want = (before - u.step_size * u.scale * (u_ @ direction @ vh)) * u.decay
    torch.testing.assert_close(w, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(exp_avg, 0.1 * low)


@pytest.mark.parametrize("device", DEVICES)
def test_int8_weight_part_writes_weight_and_scale_by_stochastic_rounding(device):
    torch.manual_seed(0)
    layer = Int8Linear.from_linear(nn.Linear(32, 24), group_size=8).to(device)
    w = layer.weight
    part = Int8SRWeight()
    assert part.accepts(w) and not part.accepts(layer.bias)
    r = 4
    ortho = orthonormal(24, r, device)  # left projection of a 24 x 32 weight
    low = randn(r, 32, seed=1, device=device)
    exp_avg, exp_avg_sq = torch.zeros(r, 32, device=device), torch.zeros(r, 32, device=device)
    w.grad = torch.ones(24, 32, device=device)
    before = layer.dequantized_weight()
    scale_obj = layer.scale
    u = update(step=1)
    part.apply_low_rank(part.local(w), low, exp_avg, exp_avg_sq, ortho, None, "left", u)
    assert w.qdata.dtype == torch.int8 and layer.scale is scale_obj  # written in place
    direction = (0.1 * low) / ((0.01 * low * low).sqrt() + u.eps)
    want = (before - u.step_size * u.scale * (ortho @ direction)) * u.decay
    got = dequantize_int8(w.qdata, layer.scale, 8)
    # stochastic rounding: within one quantization step of the exact value, element by element
    step = layer.scale.repeat_interleave(8).reshape(24, 32)
    assert bool(((got - want).abs() <= step * (1 + 1e-5)).all())
    with pytest.raises(ValueError, match="must be in a param group with a 'rank'"):
        part.check_param(w, {})
    with pytest.raises(ValueError, match="must belong to a weightkit.nn.Int8Linear"):
        part.check_param(nn.Parameter(torch.zeros(4, 4, dtype=torch.int8), requires_grad=False), {"rank": 2})


# -- refresh schedules -------------------------------------------------------------------------------------------------
def test_fixed_refresh_and_its_staggered_variant():
    group = {"update_proj_gap": 4}
    fixed, stagger = FixedRefresh(), FixedRefresh(stagger=True)
    assert [fixed.due({"step": s}, group, True, key=2) for s in range(9)] == [s % 4 == 0 for s in range(9)]
    assert fixed.due({"step": 3}, group, False, key=0)  # no basis yet: always
    # 10 layers, gap 4: after the first step, no step refreshes more than ceil(10 / 4) = 3 layers, each layer
    # refreshes exactly once per period
    per_step = [sum(stagger.due({"step": s}, group, True, key=k) for k in range(10)) for s in range(1, 13)]
    assert max(per_step) == 3 and sum(per_step) == 30
    for k in range(10):
        assert sum(stagger.due({"step": s}, group, True, key=k) for s in range(1, 13)) == 3


@pytest.mark.parametrize("device", DEVICES)
def test_lazy_refresh_grows_the_interval_when_the_subspace_stays(device):
    lazy = LazyRefresh(cos_threshold=0.9, gamma_proj=2.0, queue_size=2)
    group = {"update_proj_gap": 3, **lazy.group_keys}
    lazy.check_group(group)
    ortho = orthonormal(16, 4, device)
    state = {"step": 0}
    assert lazy.due(state, group, False, 0)
    for refresh, want_gap in ((1, 3), (2, 3), (3, 6), (4, 12)):
        state.update(lazy.entries(state, group, ortho, "left"))
        assert state["refresh_count"] == refresh and state["gap"] == want_gap
        assert state["next_refresh"] == state["step"] + want_gap
        assert not lazy.due(state, group, True, 0)
        state["step"] = state["next_refresh"]
        assert lazy.due(state, group, True, 0)
    assert state["similarities"].numel() == 2 and state["similarities"].device == ortho.device
    with pytest.raises(ValueError, match="queue_size must be an int >= 1"):
        lazy.check_group(dict(group, queue_size=0))


# -- composition -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_parts_compose_beyond_the_presets(device):
    """Float weights with an INT4 basis and float32 moments (no preset has it): trains like GaLoreAdamW, keeps the
    INT4 entries, and rejects a two-sided projection."""
    def run(parts):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 8)).to(device)
        groups = [{"params": [model[0].weight], "rank": 8, "update_proj_gap": 5, "scale": 0.5},
                  {"params": [model[0].bias, model[2].weight, model[2].bias]}]
        opt = GaLoreAdamW(groups, lr=1e-2, parts=parts)
        x, y = randn(16, 32, seed=1, device=device), randn(16, 8, seed=2, device=device)
        losses = []
        for _ in range(30):
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        return losses, opt.state[model[0].weight]

    ref, _ = run(None)
    int4, state = run(GaLoreParts(basis=Int4Basis(proj_group_size=16)))
    assert "ortho_q" in state and "ortho" not in state and state["exp_avg"].dtype == torch.float32
    # both fit (loss 0.98 -> ~0.02); the INT4 basis ends within 1.5% of the initial loss of the float one (measured
    # on CPU: 0.57%)
    assert int4[-1] < 0.05 * int4[0] and abs(int4[-1] - ref[-1]) < 0.015 * ref[0], (int4[-1], ref[-1])
    w = nn.Parameter(torch.zeros(8, 8, device=device))
    with pytest.raises(ValueError, match="proj_type='full' is not supported"):
        GaLoreAdamW([{"params": [w], "rank": 2, "proj_type": "full"}], parts=GaLoreParts(basis=Int4Basis()))
    with pytest.raises(TypeError, match="parts must be a GaLoreParts"):
        GaLoreAdamW([w], parts=FloatBasis())


@pytest.mark.parametrize("device", DEVICES)
def test_staggered_refresh_in_the_optimizer(device):
    """stagger_refresh=True: 6 layers, gap 3: the first step computes every basis, later steps 2 each."""
    torch.manual_seed(0)
    ws = [nn.Parameter(torch.randn(16, 12, device=device)) for _ in range(6)]
    opt = GaLoreAdamW([{"params": ws, "rank": 2, "update_proj_gap": 3}], lr=1e-3, stagger_refresh=True)
    counts = []
    for step in range(7):
        for i, w in enumerate(ws):
            w.grad = randn(16, 12, seed=step * 10 + i, device=device)
        before = [opt.state[w]["ortho"].clone() if "ortho" in opt.state[w] else None for w in ws]
        opt.step()
        counts.append(sum(b is None or not torch.equal(b, opt.state[w]["ortho"]) for b, w in zip(before, ws)))
    assert counts == [6, 2, 2, 2, 2, 2, 2]
    # the same schedule in layer-wise mode, where every per-parameter optimizer holds key 0
    layerwise = LayerwiseGaLore([{"params": ws, "rank": 2, "update_proj_gap": 3}], hooks=False, lr=1e-3,
                                stagger_refresh=True)
    counts = []
    for step in range(7):
        refreshed = 0
        for i, (w, opt_i) in enumerate(zip(ws, layerwise.optimizers)):
            w.grad = randn(16, 12, seed=step * 10 + i, device=device)
            before = opt_i.state[w]["ortho"].clone() if "ortho" in opt_i.state[w] else None
            layerwise.step_param(w)
            refreshed += before is None or not torch.equal(before, opt_i.state[w]["ortho"])
        counts.append(refreshed)
    assert counts == [6, 2, 2, 2, 2, 2, 2]
    pytest.importorskip("bitsandbytes")  # QGaLoreAdamW8bit builds its 8-bit moments with it
    with pytest.raises(ValueError, match="stagger_refresh applies to the fixed"):
        QGaLoreAdamW8bit([{"params": ws, "rank": 2}], stagger_refresh=True)


# -- the import graph --------------------------------------------------------------------------------------------------
def _imports(path, package):
    """Modules of ``package`` that the file imports (at any depth: function-level imports count too)."""
    out = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            mod = f"{base}.{node.module}" if node.module else base
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("weightkit"):
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("weightkit"))
    return out


def test_optim_import_graph_has_no_circle_and_nothing_imports_optim_back():
    import weightkit

    root = os.path.dirname(weightkit.__file__)
    folder = os.path.join(root, "optim")
    modules = {f"weightkit.optim.{f[:-3]}": os.path.join(folder, f) for f in os.listdir(folder)
               if f.endswith(".py") and f != "__init__.py"}
    graph = {m: {d for d in _imports(p, "weightkit.optim") if d in modules and d != m} for m, p in modules.items()}
    state = {}

    def visit(m, path):
        if state.get(m) == "done":
            return
        assert state.get(m) != "open", f"import circle: {' -> '.join(path + [m])}"
        state[m] = "open"
        for d in sorted(graph[m]):
            visit(d, path + [m])
        state[m] = "done"

    for m in sorted(graph):
        visit(m, [])
    # the parts sit below the step, the step below its presets: none of them imports a preset module
    for low in ("basis", "moments", "weights", "refresh", "projector", "galore"):
        assert not graph[f"weightkit.optim.{low}"] & {f"weightkit.optim.{m}" for m in
                                                       ("qgalore", "distributed", "layerwise")}, low
    # nn (Int8Weight's home) is below optim: nothing in weightkit.nn imports weightkit.optim
    nn_folder = os.path.join(root, "nn")
    for f in os.listdir(nn_folder):
        if f.endswith(".py"):
            deps = _imports(os.path.join(nn_folder, f), "weightkit.nn")
            assert not any(d.startswith("weightkit.optim") for d in deps), f


def test_8bit_moments_without_bitsandbytes_say_how_to_get_it(monkeypatch):
    import sys

    from weightkit.optim import GaLoreAdamW8bit

    for name in [m for m in sys.modules if m == "bitsandbytes" or m.startswith("bitsandbytes.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes -> ImportError
    monkeypatch.setattr(moments_module, "_BNBF", None)  # as in a process that never imported it (the import is cached)
    w = torch.nn.Parameter(torch.randn(16, 32))
    with pytest.raises(ImportError, match=r"weightkit\[bnb\]"):
        GaLoreAdamW8bit([{"params": [w], "rank": 4}], lr=1e-3)
