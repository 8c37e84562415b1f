"""The precision contract of Q-GaLore's projection GEMMs (#24 item 1d): a precision of the products R = P^T G (or
G P^T) and N = P U (or U P) is allowed when its error against the float64 evaluation of the same step (same INT4
basis, same gradient) stays within ``CONTRACT_FACTOR`` times the error galore-torch's float32 step shows against it.

``precision_errors`` measures both (relative Frobenius errors); the test holds weightkit's float32 path to the
contract and shows that a bfloat16 product (operands rounded to bf16, float32 accumulation: tensor cores) breaks
it by orders of magnitude, which is why ``lowrank_precision`` defaults to 'fp32'; the Triton write-back's 'bf16x3'
product (bf16 tensor-core products that round nothing) meets it."""

import pytest
import torch

from weightkit.ops.int4 import quantize_int4
from weightkit.ops.qgalore import lowrank_product
from weightkit.optim.basis import Int4Basis, PackedInt4

CONTRACT_FACTOR = 2.0


def _rel(x, ref):
    return float((x.double() - ref).norm() / ref.norm())


def precision_errors(m=512, n=256, r=64, seed=0, proj_group_size=64):
    """{(product, who): relative error vs float64} for product in ('R', 'N') and who in ('galore-torch fp32',
    'weightkit fp32', 'weightkit bf16'), on a right projection (m >= n, galore-torch's 'std' side)."""
    from galore_torch.galore_projector import GaLoreProjector

    gen = torch.Generator().manual_seed(seed)
    grad = torch.randn(m, n, generator=gen) * 1e-2
    basis = torch.linalg.qr(torch.randn(n, r, generator=gen, dtype=torch.float64))[0].T.float().contiguous()
    q, s, z = quantize_int4(basis, proj_group_size)
    packed = PackedInt4(q, s, z, proj_group_size, (r, n))
    p32 = packed.dequantize()  # the basis every evaluation uses (exact values)
    direction = torch.randn(m, r, generator=gen)
    ref_r = grad.double() @ p32.double().T
    ref_n = direction.double() @ p32.double()

    proj = GaLoreProjector(rank=r, update_proj_gap=200, proj_type="std")
    proj.ortho_matrix = p32
    out = {("R", "galore-torch fp32"): _rel(proj.project(grad, 1), ref_r),
           ("N", "galore-torch fp32"): _rel(proj.project_back(direction), ref_n)}
    out[("R", "weightkit fp32")] = _rel(Int4Basis.project(grad, "right", (packed, None)), ref_r)
    out[("R", "weightkit bf16")] = _rel(grad.bfloat16().float() @ p32.bfloat16().float().T, ref_r)
    for precision in ("fp32", "bf16"):
        out[("N", f"weightkit {precision}")] = _rel(
            lowrank_product(q, s, z, direction, proj_group_size, (r, n), False, precision), ref_n)
    # the Triton write-back's own product (kernels.qgalore._lowrank_tile; in the interpreter here, on a GPU in
    # tests/ops/test_qgalore_ops.py::test_compiled_write_back_on_cuda): 'bf16x3' multiplies the basis' exact
    # integers by a three-part bf16 split of U, float32 sums
    from weightkit.kernels.qgalore import lowrank_product_triton

    out[("N", "weightkit triton bf16x3")] = _rel(
        lowrank_product_triton(q, s, z, direction, proj_group_size, m, n, False, "bf16x3"), ref_n)
    return out


def test_fp32_products_meet_the_contract_and_bf16_does_not():
    pytest.importorskip("galore_torch")
    print("seed 0")
    errors = precision_errors()
    for product in ("R", "N"):
        bound = CONTRACT_FACTOR * errors[(product, "galore-torch fp32")]
        assert errors[(product, "weightkit fp32")] <= bound, (product, errors)
        assert errors[(product, "weightkit bf16")] > 100 * bound, (product, errors)  # not allowed
    assert errors[("N", "weightkit triton bf16x3")] <= CONTRACT_FACTOR * errors[("N", "galore-torch fp32")], errors
