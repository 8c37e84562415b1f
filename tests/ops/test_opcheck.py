"""torch.library.opcheck through the public handle ``torch.ops.weightkit.<op>.default`` of every op weightkit defines
(schema, fake kernel, autograd registration, in-place aliasing, torch.compile), on every device (CPU and, when
present, CUDA). The extension's own ``<op>_kernel`` ops are the backends' business (tests/ops/test_*_ops.py)."""

import pytest
import torch

from tests.conftest import DEVICES
from weightkit.ops.int4 import quantize_int4
from weightkit.ops.int8 import absmax_scale, stochastic_round_int8


def _int8_weight(rows, cols, group, device):
    w = torch.randn(rows, cols, device=device)
    scale = absmax_scale(w, group)
    return stochastic_round_int8(w, scale, group, seed=3), scale


def _int4(rows, cols, group, device):
    return quantize_int4(torch.randn(rows, cols, device=device), group)


def _galore_args(device, left):
    m, n, r = 16, 12, 4
    low_shape = (r, n) if left else (m, r)
    ortho = torch.linalg.qr(torch.randn(m if left else n, r, device=device))[0]
    ortho = ortho if left else ortho.T.contiguous()
    return (torch.randn(m, n, device=device), torch.randn(low_shape, device=device),
            torch.randn(low_shape, device=device) * 0.1, torch.rand(low_shape, device=device) * 0.1, ortho, left,
            0.9, 0.999, 1e-6, 1e-2, 0.5, 0.99)


def _bitmask_args(device):
    from weightkit.ops.dictionary import pack_bitmask

    idx = torch.rand(40, 9, device=device).argsort(0)[:5].to(torch.uint8)  # k = 40: two mask words per column
    bitmask, values, word_offsets = pack_bitmask(idx, torch.randn(5, 9, device=device), 40)
    return torch.randn(6, 40, device=device), values, bitmask, word_offsets


def _adam8_args(device):
    bnbf = pytest.importorskip("bitsandbytes.functional")
    codes = [bnbf.create_dynamic_map(signed=s).to(device) for s in (True, False)]
    q, absmax = [], []
    for x, code in ((torch.randn(300, device=device), codes[0]), (torch.rand(300, device=device), codes[1])):
        qx, state = bnbf.quantize_blockwise(x, code=code, blocksize=256)
        q.append(qx), absmax.append(state.absmax)
    return (torch.randn(300, device=device), q[0], absmax[0], q[1], absmax[1], *codes, torch.empty(300, device=device),
            0.9, 0.999, 1e-6)


# op name -> (device -> arguments of the op's schema)
CASES = {
    "stochastic_round_int8": lambda d: (lambda x: (x, absmax_scale(x, 32), 32, 1, 0))(torch.randn(8, 32, device=d)),
    "int8_sr_update_": lambda d: (*_int8_weight(4, 16, 8, d), torch.randn(4, 16, device=d), 8, 0.99, 1, 0),
    "int8_matmul": lambda d: (torch.randn(4, 32, device=d), *_int8_weight(16, 32, 8, d), 8, False),
    # Int8Linear's write-back of any optimizer's in-place update (weightkit.nn.int8): [seed, count] stays on the CPU
    "int8_assign_sr_": lambda d: (*_int8_weight(4, 16, 8, d), torch.tensor([3, 0]), torch.randn(4, 16, device=d), 8),
    "quantize_int4": lambda d: (torch.randn(6, 8, device=d), 4),
    "dequantize_int4": lambda d: (*_int4(12, 8, 4, d), 4, [12, 8]),
    "int4_matmul": lambda d: (torch.randn(3, 8, device=d), *_int4(12, 8, 4, d), 4, [12, 8], False),
    "galore_adam_update_": lambda d: _galore_args(d, left=False),
    "lowrank_update_": lambda d: (lambda a: (a[0], a[2], a[4], a[5], 1e-2, 0.5, 0.99))(_galore_args(d, left=True)),
    "int8_sr_lowrank_update_": lambda d: (*_int8_weight(16, 12, 4, d), *_int4(16, 4, 4, d),
                                          torch.randn(4, 12, device=d), 4, 4, True, 0.1, 0.99, "fp32", 1, 0),
    "blockwise8bit_adam_": lambda d: _adam8_args(d),
    "bf16_parts": lambda d: (torch.randn(6, 8, device=d), 1),
    "memory_lookup_forward": lambda d: (torch.randn(6, 8, device=d), torch.randn(2, 16, 8, device=d) * 0.1, 1.0),
    "memory_lookup_backward": lambda d: (torch.randn(6, 8, device=d), torch.randn(6, 8, device=d),
                                         torch.randn(2, 16, 8, device=d) * 0.1, 1.0, True),
    "dict_bitmask_matmul": _bitmask_args,
    "dict_bitmask_matmul_backward": lambda d: (torch.randn(6, 9, device=d), *_bitmask_args(d)),
}


def public_ops():
    """The weightkit:: ops defined through weightkit.ops._registry.define (the extension's are ``*_kernel``)."""
    names = [n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("weightkit::")]
    return sorted(n for n in names if not n.endswith("_kernel"))


def test_every_op_has_a_case():
    assert public_ops() == sorted(CASES)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(CASES))
def test_opcheck(name, device):
    torch.manual_seed(0)
    args = CASES[name](device)
    torch.library.opcheck(getattr(torch.ops.weightkit, name).default, args)


# ops that take the optimizers' device-side flags (Tensor? found_inf, Tensor? step_size_t): checked with them too
FLAGGED = {
    "int8_sr_update_": lambda d: (torch.zeros(1, device=d),),
    "int8_sr_lowrank_update_": lambda d: (torch.zeros(1, device=d), torch.full((), 0.5, device=d)),
    "blockwise8bit_adam_": lambda d: (torch.ones(1, device=d),),
    "galore_adam_update_": lambda d: (torch.ones(1, device=d), torch.full((1,), 0.5, device=d)),
    "lowrank_update_": lambda d: (torch.zeros(1, device=d), torch.full((1,), 0.5, device=d)),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(FLAGGED))
def test_opcheck_with_device_flags(name, device):
    torch.manual_seed(0)
    args = CASES[name](device) + FLAGGED[name](device)
    torch.library.opcheck(getattr(torch.ops.weightkit, name).default, args)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_int4_matmul_float32_out(device):
    """int4_matmul's ``out_dtype=float32`` for a bf16 x (GaLore's projections of a 16-bit gradient), x needing its
    gradient (the autograd formula: x's dtype)."""
    torch.manual_seed(0)
    x = torch.randn(3, 8, device=device).to(torch.bfloat16).requires_grad_()
    torch.library.opcheck(torch.ops.weightkit.int4_matmul.default,
                          (x, *_int4(12, 8, 4, device), 4, [12, 8], False, torch.float32))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_bf16_parts_of_a_strided_float16_x(device):
    torch.manual_seed(0)
    x = torch.randn(8, 12, device=device).half()[:, ::2]
    torch.library.opcheck(torch.ops.weightkit.bf16_parts.default, (x, 0))
