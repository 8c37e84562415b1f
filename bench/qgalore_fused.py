"""Q-GaLore's fused optimizer ops on a GPU (#24 item 1): what the next GPU run measures, in one call.

``measure(device="cuda") -> list of dict rows`` (also ``python -m bench.qgalore_fused`` prints them as JSON lines):

* ``sr_lowrank``: ``int8_sr_lowrank_update_`` on a 4096 x 4096 int8 weight (group 128), rank 1024 (left) and
  4096 x 11008 rank 1024 (right): Triton at precision fp32 / tf32x3 / bf16x3 / bf16, the composed cuda backend (fp32:
  six bf16 products of three-part splits; bf16: bf16 products, both one cuBLAS GEMM a block of rows), and the
  unfused path it replaces (dequantize the INT4 basis, P @ U in float32, int8_sr_update_) -- milliseconds, the
  fraction of copy bandwidth for the int8 weight's bytes (read + write, plus its scales) next to ``x.clone()``
  of the same bytes, and the product's FLOP rate;
* ``sr_lowrank_check``: the compiled kernel against the reference (codes off by at most one in <= 1% of the
  elements, scales within 1e-5: the CPU tests' contract, which the interpreter cannot check for compiled code);
* ``precision``: the relative error of the product P U against float64 for each precision on the GPU, and of
  galore-torch's float32 product (the contract of tests/optim/test_qgalore_precision.py: within 2x of it;
  'tf32x3' is only measurable here; the bf16-operand dot is wrong in Triton 3.9's interpreter, so that row means
  something on a GPU only), and of the write-back's own product at each precision (``write-back product ...``:
  kernels.qgalore.lowrank_product_triton, the kernel's tiles alone; 'bf16x3' is within the contract in the
  interpreter);
* ``moments``: ``blockwise8bit_adam_`` (Triton, one pass) vs bitsandbytes' dequantize -> update -> quantize on a
  1024 x 4096 low-rank moment pair, and the fraction of copy bandwidth of its bytes;
* ``projection``: R = P^T G (left, 4096 x 4096 rank 1024) / G P^T (right, 4096 x 11008) by ``int4_matmul`` on the
  packed basis vs dequantize + float32 matmul; and a bf16 gradient's with ``out_dtype=float32`` (as the optimizer
  runs it) on the triton and cuda backends (on triton, no float32 copy: right, exact products of the bf16 values and
  the basis' integers; left, three exact products with the basis' values split in bf16 parts; on cuda the gradient
  converted to float32 by blocks) against its whole float32 copy + ``int4_matmul``, in float32 and with TF32
  allowed (time and error against float64); and a float32 gradient's without TF32: the optimizer's projection
  (Int4Basis.project) against int4_matmul's Triton kernel with G's tiles split in three bf16 parts (SPLIT_X) and
  with its FMA dots (time and error against float64).

End to end (the issue's table rows) runs through ``weightkit train --model-size 7b --methods qgalore-layerwise
--checkpointing --dtype bfloat16 --steps 20`` (peak and its breakdown printed beside it) and the 309M comparison of
bench/gpu_report.
"""

from __future__ import annotations

import json
import sys

import torch


def _ms(fn, warmup=5, rep=20):
    if not torch.cuda.is_available():  # a CPU dry run (TRITON_INTERPRET=1): one call, the numbers mean nothing
        import time

        start = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - start)
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep))


def _copy_ms(nbytes, device):
    x = torch.empty(nbytes // 2, dtype=torch.int16, device=device)
    return _ms(lambda: x.clone())


def _weight(m, n, gs, device):
    from weightkit.ops.int8 import absmax_scale, stochastic_round_int8

    w = torch.randn(m, n, device=device)
    s = absmax_scale(w, gs)
    return stochastic_round_int8(w, s, gs, seed=1), s


def _basis(shape, pg, device):
    from weightkit.ops.int4 import quantize_int4

    p = torch.linalg.qr(torch.randn(max(shape), min(shape), device=device))[0]
    p = p if shape[0] >= shape[1] else p.T.contiguous()
    return quantize_int4(p, pg)


def measure(device="cuda", shapes=((4096, 4096, 1024, True), (4096, 11008, 1024, False)), gs=128, pg=64,
            moment_shape=(1024, 4096), rows=None):
    from weightkit import use_backend
    from weightkit.backend import allow_tf32
    from weightkit.ops import int4 as int4_ops
    from weightkit.ops.int4 import dequantize_int4, int4_matmul
    from weightkit.ops.int8 import int8_sr_update_
    from weightkit.ops.moments8bit import blockwise8bit_adam_
    from weightkit.kernels.qgalore import lowrank_product_triton
    from weightkit.ops.qgalore import int8_sr_lowrank_update_, lowrank_product

    rows = [] if rows is None else rows  # (bench/gpu_report.py passes one that records each row as it comes)
    for m, n, r, left in shapes:
        q0, s0 = _weight(m, n, gs, device)
        bshape = (m, r) if left else (r, n)
        bq, bs, bz = _basis(bshape, pg, device)
        u = torch.randn((r, n) if left else (m, r), device=device)
        wbytes = 2 * (q0.numel() + 4 * s0.numel())  # int8 weight and scales, read and written
        copy = _copy_ms(wbytes // 2, device)
        flops = 2 * m * n * r
        shape = [m, n, r, "left" if left else "right"]
        q, s = q0.clone(), s0.clone()

        def fused(backend, precision):
            def fn():
                with use_backend(backend):
                    int8_sr_lowrank_update_(q, s, bq, bs, bz, u, gs, pg, left, alpha=1e-3, decay=1.0,
                                            precision=precision, seed=3, offset=0)
            return fn

        def unfused():
            basis = dequantize_int4(bq, bs, bz, pg, bshape)
            delta = (basis @ u if left else u @ basis).mul_(-1e-3)
            int8_sr_update_(q, s, delta, gs, decay=1.0, seed=3, offset=0)

        for backend, precision in (("triton", "fp32"), ("triton", "tf32x3"), ("triton", "bf16x3"), ("triton", "bf16"),
                                   ("cuda", "fp32"), ("cuda", "bf16")):
            try:
                ms = _ms(fused(backend, precision))
                rows.append(dict(section="sr_lowrank", shape=shape, backend=backend, precision=precision, ms=ms,
                                 copy_fraction=copy / ms, tflops=flops / ms / 1e9))
            except Exception as exc:  # noqa: BLE001 - recorded, not hidden
                rows.append(dict(section="sr_lowrank", shape=shape, backend=backend, precision=precision,
                                 error=f"{type(exc).__name__}: {exc}"))
        ms = _ms(unfused)
        rows.append(dict(section="sr_lowrank", shape=shape, backend="unfused (dequantize, matmul, int8_sr_update_)",
                         precision="fp32 (torch matmul setting)", ms=ms, copy_fraction=copy / ms))

        # compiled kernel vs reference
        for precision in ("fp32", "tf32x3", "bf16x3", "bf16"):
            got, want = [(q0.clone(), s0.clone()) for _ in range(2)]
            with use_backend("triton"):
                int8_sr_lowrank_update_(*got, bq, bs, bz, u, gs, pg, left, alpha=0.05, decay=0.99,
                                        precision=precision, seed=5, offset=0)
            with use_backend("reference"):
                int8_sr_lowrank_update_(*want, bq, bs, bz, u, gs, pg, left, alpha=0.05, decay=0.99,
                                        precision="bf16" if precision == "bf16" else "fp32", seed=5, offset=0)
            diff = (got[0].int() - want[0].int()).abs()
            rows.append(dict(section="sr_lowrank_check", shape=shape, precision=precision,
                             max_code_diff=int(diff.max()), frac_codes_diff=float((diff > 0).float().mean()),
                             scale_max_rel=float(((got[1] - want[1]).abs() / want[1]).max()),
                             ok=bool(diff.max() <= 1 and (diff > 0).float().mean() <= 0.01)))

        # precision of the product on this GPU against float64
        p32 = dequantize_int4(bq, bs, bz, pg, bshape)
        ref = (p32.double() @ u.double()) if left else (u.double() @ p32.double())
        err = lambda x: float((x.double() - ref).norm() / ref.norm())  # noqa: E731
        with allow_tf32(False):  # galore-torch's step in strict float32
            galore_fp32 = err(p32 @ u if left else u @ p32)
        rows.append(dict(section="precision", shape=shape, who="float32 matmul (galore-torch's)", rel_err=galore_fp32))
        rows.append(dict(section="precision", shape=shape, who="reference bf16",
                         rel_err=err(lowrank_product(bq, bs, bz, u, pg, bshape, left, "bf16"))))
        # the kernel's dot at each input precision, on the same operands (the fused op does not expose N)
        rows.append(dict(section="precision", shape=shape, who="triton tl.dot tf32x3",
                         rel_err=err(_triton_dot(p32, u, left, "tf32x3"))))
        rows.append(dict(section="precision", shape=shape, who="triton tl.dot ieee",
                         rel_err=err(_triton_dot(p32, u, left, "ieee"))))
        rows.append(dict(section="precision", shape=shape, who="triton tl.dot bf16 operands",
                         rel_err=err(_triton_dot(p32.bfloat16(), u.bfloat16(), left, "ieee"))))
        # the write-back's own product at each precision (kernels.qgalore.lowrank_product_triton: its tiles, alone)
        for precision in ("fp32", "tf32x3", "bf16x3", "bf16"):
            rows.append(dict(section="precision", shape=shape, who=f"write-back product {precision}",
                             rel_err=err(lowrank_product_triton(bq, bs, bz, u, pg, m, n, left, precision, gs))))

        # projection R = G P^T (right) / P^T G (left)
        g = torch.randn(m, n, device=device)
        args = (bq, bs, bz, pg, bshape)
        proj = (lambda: int4_matmul(g.T, *args, transpose=True).T) if left else \
            (lambda: int4_matmul(g, *args, transpose=False))
        dense = (lambda: dequantize_int4(*args).T @ g) if left else (lambda: g @ dequantize_int4(*args).T)
        rows.append(dict(section="projection", shape=shape, backend="int4_matmul packed", ms=_ms(proj)))
        rows.append(dict(section="projection", shape=shape, backend="dequantize + fp32 matmul", ms=_ms(dense)))
        for rec in _float32_projection_rows(g, args, left, shape):  # (append: the report streams each row)
            rows.append(rec)
        # a 16-bit gradient's projection with a float32 result (int4_matmul's out_dtype=float32, as Int4Basis.project
        # runs it) on each GPU backend: right, Triton multiplies the 16-bit values by the basis' integers (exact
        # products on 16-bit tensor cores, no float32 copy); left, by the basis' values split in three bf16 parts
        # (SPLIT3, no float32 copy; an fp16 tile split in two bf16 parts too: five products); on cuda, without
        # TF32, W's values in three bf16 parts for three cuBLAS products with float32 results (an fp16 gradient in
        # two bf16 parts too, by blocks of rows: five) (_blocked.split3_dequant_matmul; with TF32 allowed: the
        # gradient to float32 by blocks). bf16 last: its gradient and reference serve the float32 copy's rows after
        # the loop
        w64 = dequantize_int4(*args).double()
        for dtype, tag in ((torch.float16, "fp16"), (torch.bfloat16, "bf16")):
            g16 = g.to(dtype)
            ref = (w64.T @ g16.double()) if left else (g16.double() @ w64.T)
            out32 = (lambda g16=g16: int4_matmul(g16.T, *args, transpose=True, out_dtype=torch.float32).T) if left \
                else (lambda g16=g16: int4_matmul(g16, *args, out_dtype=torch.float32))
            for backend in ("triton", "cuda"):
                name = f"int4_matmul {backend} float32 out from {tag}"
                why_not = int4_ops._MM.why_not(backend, g16.device)  # (forced, it would fall back: a mislabelled row)
                if why_not is not None:
                    rows.append(dict(section="projection", shape=shape, backend=name, error=f"skipped: {why_not}"))
                    continue
                with use_backend(backend):
                    y = out32()
                    rows.append(dict(section="projection", shape=shape, backend=name, ms=_ms(out32),
                                     rel_err=float((y.double() - ref).norm() / ref.norm())))
        conv = (lambda: int4_matmul(g16.float().T, *args, transpose=True).T) if left else \
            (lambda: int4_matmul(g16.float(), *args, transpose=False))  # the whole float32 copy, for comparison
        rows.append(dict(section="projection", shape=shape, backend="bf16 -> float32 copy + int4_matmul",
                         ms=_ms(conv), rel_err=float((conv().double() - ref).norm() / ref.norm())))
        with allow_tf32(True):  # the same with TF32 allowed (the 7B call's --tf32): faster than three bf16 products?
            rows.append(dict(section="projection", shape=shape, backend="bf16 -> float32 copy + int4_matmul tf32",
                             ms=_ms(conv), rel_err=float((conv().double() - ref).norm() / ref.norm())))

    # moments: one pass vs bitsandbytes' three
    try:
        import bitsandbytes.functional as bnbf

        low = torch.randn(*moment_shape, device=device)
        cs, cu = (bnbf.create_dynamic_map(signed=s_).to(device) for s_ in (True, False))
        qm, sm = bnbf.quantize_blockwise(low * 0.1, code=cs, blocksize=256)
        qv, sv = bnbf.quantize_blockwise(low * low * 0.01, code=cu, blocksize=256)
        state = [qm, sm.absmax, qv, sv.absmax]

        def fused_moments():
            with use_backend("triton"):
                blockwise8bit_adam_(low, *state, cs, cu, beta1=0.9, beta2=0.999, eps=1e-6)

        def three_pass():
            mm = bnbf.dequantize_blockwise(qm, absmax=sm.absmax, code=cs, blocksize=256)
            vv = bnbf.dequantize_blockwise(qv, absmax=sv.absmax, code=cu, blocksize=256)
            mm.mul_(0.9).add_(low, alpha=0.1)
            vv.mul_(0.999).addcmul_(low, low, value=0.001)
            d = mm / (vv.sqrt() + 1e-6)
            bnbf.quantize_blockwise(mm, code=cs, blocksize=256)
            bnbf.quantize_blockwise(vv, code=cu, blocksize=256)
            return d

        nbytes = 2 * 2 * low.numel() + 4 * low.numel() * 2  # codes read+written, gradient read, direction written
        copy = _copy_ms(nbytes, device)
        for name, fn in (("blockwise8bit_adam_ triton", fused_moments), ("bitsandbytes 3 passes", three_pass)):
            ms = _ms(fn)
            rows.append(dict(section="moments", shape=list(moment_shape), backend=name, ms=ms, copy_fraction=copy / ms))
    except ImportError as exc:
        rows.append(dict(section="moments", error=f"bitsandbytes missing: {exc}"))
    return rows


def _float32_projection_rows(g, args, left, shape):
    """A float32 gradient's projection with TF32 not allowed (torch's default), time and error against float64:
    the optimizer's (Int4Basis.project: above SPLIT_FLOAT32_MIN_RANK / _FLOPS the dequantized basis and G in three
    bf16 parts each, six products in cuBLAS GEMMs; else int4_matmul) against int4_matmul's Triton kernel with x
    split in three bf16 parts for the tensor cores (SPLIT_X: three products, G read once) and with the FMA dots
    (kernels._shared.FLOAT32_X_SPLIT off): which of the two the optimizer should take at these shapes."""
    from weightkit.backend import allow_tf32, use_backend
    from weightkit.kernels._shared import float32_x_split
    from weightkit.ops import int4 as int4_ops
    from weightkit.optim.basis import Int4Basis, PackedInt4

    side = "left" if left else "right"
    w64 = int4_ops.dequantize_int4(*args).double()
    ref = (w64.T @ g.double()) if left else (g.double() @ w64.T)
    basis = (PackedInt4(*args[:4], tuple(args[4])), None)
    runs = [("Int4Basis.project float32 strict", None, lambda: Int4Basis.project(g, side, basis))]
    if int4_ops._MM.why_not("triton", g.device) is None:
        call = (lambda: int4_ops.int4_matmul(g.T, *args, transpose=True).T) if left else \
            (lambda: int4_ops.int4_matmul(g, *args))
        runs += [("int4_matmul triton float32 split x", True, call), ("int4_matmul triton float32 fma", False, call)]
    out = []
    for name, split, fn in runs:
        try:
            with allow_tf32(False), use_backend("auto" if split is None else "triton"), \
                    float32_x_split(split is not False):
                y = fn()
                out.append(dict(section="projection", shape=shape, backend=name, ms=_ms(fn),
                                rel_err=float((y.double() - ref).norm() / ref.norm())))
        except Exception as exc:  # noqa: BLE001 - recorded, not hidden
            out.append(dict(section="projection", shape=shape, backend=name, error=f"{type(exc).__name__}: {exc}"))
    return out


def _triton_dot(p, u, left, precision):
    """P U (left) or U P by one Triton tl.dot per tile at ``input_precision`` (float32 accumulation)."""
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(a_ptr, b_ptr, c_ptr, M, N, K, PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
               BK: tl.constexpr):
        rm = tl.program_id(0) * BM + tl.arange(0, BM)
        rn = tl.program_id(1) * BN + tl.arange(0, BN)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            rk = k0 + tl.arange(0, BK)
            a = tl.load(a_ptr + rm[:, None] * K + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
            b = tl.load(b_ptr + rk[:, None] * N + rn[None, :], mask=(rk[:, None] < K) & (rn[None, :] < N), other=0.0)
            acc = tl.dot(a, b, acc=acc, input_precision=PREC, out_dtype=tl.float32)
        tl.store(c_ptr + rm[:, None] * N + rn[None, :], acc, mask=(rm[:, None] < M) & (rn[None, :] < N))

    a, b = (p, u) if left else (u, p)
    a, b = a.contiguous(), b.contiguous()
    c = torch.empty(a.shape[0], b.shape[1], device=a.device)
    grid = (triton.cdiv(a.shape[0], 64), triton.cdiv(b.shape[1], 64))
    kernel[grid](a, b, c, a.shape[0], b.shape[1], a.shape[1], PREC=precision, BM=64, BN=64, BK=32)
    return c


if __name__ == "__main__":
    for row in measure(sys.argv[1] if len(sys.argv) > 1 else "cuda"):
        print(json.dumps(row))
