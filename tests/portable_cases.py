"""Every CPU kernel of weightkit._C on fixed inputs: used by tests/test_portable.py to run the SAME built module under
two torch releases and compare the outputs bit for bit.

``python -m tests.portable_cases FILE`` (run from the repository root, by the other torch's interpreter) loads the
inputs and outputs that the first torch saved in FILE, recomputes every case on the ``cpu`` backend (and on the
``reference`` backend for the cases whose kernels are specified bit-exactly), prints one JSON line with the result
and exits non-zero on any difference.
"""

from __future__ import annotations

import json
import sys
from typing import Callable, Dict, Tuple

import torch

from weightkit import native, use_backend
from weightkit.backends.cpu.dictionary import DICT_BITMASK_DIRECT_TOKENS
from weightkit.ops import dictionary, galore, int4, int8, memoryformer, moments8bit


def make_inputs(seed: int = 0) -> Dict[str, tuple]:
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(dtype)

    w = randn(96, 256)
    w_scale = int8.absmax_scale(w, 64)
    w_q = int8.stochastic_round_int8(w, w_scale, 64, seed=3)
    p4 = int4.quantize_int4(randn(96, 128), 64)
    d_out = 48
    bk, bs = 70, 20  # S in the bitmask format: the direct kernels (few tokens), the dense decode and gather (many)
    bitmask, bvalues, offsets = dictionary.pack_bitmask(torch.rand(bk, d_out, generator=g).argsort(0)[:bs],
                                                        randn(bs, d_out), bk)
    # 8-bit moments: sorted 256-entry code tables (bitsandbytes' dynamic maps in use; any sorted table here, so
    # that the second torch needs no bitsandbytes), 1200 values: four whole blocks and a partial one
    code_s, code_u = torch.linspace(-1, 1, 256) ** 3, torch.linspace(0, 1, 256) ** 2
    m_q, m_absmax = moments8bit.quantize_reference(randn(40, 30) * 0.1, code_s)
    v_q, v_absmax = moments8bit.quantize_reference(randn(40, 30).abs() * 0.01, code_u)
    return {
        "adam8bit": (randn(40, 30), m_q, m_absmax, v_q, v_absmax, code_s, code_u),
        "sr_f32": (randn(33, 128), None, 64),
        "sr_bf16": (randn(33, 128, dtype=torch.bfloat16), None, 64),
        "sr_f16": (randn(1000, dtype=torch.float16), None, 8),
        "sr_update": (w_q, w_scale, randn(96, 256) * 0.05, 64),
        "int8_matvec": (randn(3, 256), w_q, w_scale, 64),
        "int8_matvec_t": (randn(3, 96), w_q, w_scale, 64),
        "int8_blocked": (randn(40, 256, dtype=torch.bfloat16), w_q, w_scale, 64),
        "int8_blocked_t": (randn(40, 96), w_q, w_scale, 64),
        "int4_quant": (randn(64, 96, dtype=torch.bfloat16), 32),
        "int4_dequant": (*p4, 64),
        "int4_matmul": (randn(20, 128), *p4, 64),
        "galore_left_f32": (randn(64, 48), randn(8, 48), randn(8, 48) * 0.1, randn(8, 48).abs() * 0.1,
                            torch.linalg.qr(randn(64, 8))[0], True),
        "galore_right_bf16": (randn(48, 64, dtype=torch.bfloat16), randn(48, 8), randn(48, 8) * 0.1,
                              randn(48, 8).abs() * 0.1, torch.linalg.qr(randn(64, 8))[0].T.contiguous(), False),
        "memory_f32": (randn(20, 6 * 4), randn(6, 16, 40), randn(20, 40)),
        "memory_bf16": (randn(5, 6 * 4, dtype=torch.bfloat16), randn(6, 16, 40, dtype=torch.bfloat16),
                        randn(5, 40, dtype=torch.bfloat16)),
        "bitmask_few_bf16": (randn(3, bk, dtype=torch.bfloat16), bvalues.to(torch.bfloat16), bitmask, offsets,
                             randn(3, d_out, dtype=torch.bfloat16)),
        "bitmask_many_f32": (randn(DICT_BITMASK_DIRECT_TOKENS + 1, bk), bvalues, bitmask, offsets,
                             randn(DICT_BITMASK_DIRECT_TOKENS + 1, d_out)),
    }


def _sr(x, _, gs):
    scale = int8.absmax_scale(x, gs)
    return (int8.stochastic_round_int8(x, scale, gs, seed=11, offset=5),)


def _sr_update(w_q, scale, delta, gs):
    w_q, scale = w_q.clone(), scale.clone()
    int8.int8_sr_update_(w_q, scale, delta, gs, decay=0.999, seed=7, offset=2)
    return w_q, scale


def _galore(weight, low_grad, m, v, ortho, left):
    weight, m, v = weight.clone(), m.clone(), v.clone()
    galore.galore_adam_update_(weight, low_grad, m, v, ortho, left, beta1=0.9, beta2=0.99, eps=1e-6, step_size=0.01,
                               scale=0.25, decay=0.999)
    return weight, m, v


def _adam8bit(low, m_q, m_absmax, v_q, v_absmax, code_s, code_u):
    state = [t.clone() for t in (m_q, m_absmax, v_q, v_absmax)]
    direction = moments8bit.blockwise8bit_adam_(low, *state, code_s, code_u, beta1=0.9, beta2=0.99, eps=1e-6)
    return (direction, *state)


def _memory(x, tables, grad):
    x, tables = x.clone().requires_grad_(), tables.clone().requires_grad_()
    y = memoryformer.memory_lookup(x, tables, 0.7)
    gx, gt = torch.autograd.grad(y, (x, tables), grad)
    return y.detach(), gx, gt


def _bitmask(z, values, bitmask, offsets, grad):
    z, values = z.clone().requires_grad_(), values.clone().requires_grad_()
    y = dictionary.dict_bitmask_matmul(z, values, bitmask, offsets)
    gz, gv = torch.autograd.grad(y, (z, values), grad)
    return y.detach(), gz, gv


CASES: Dict[str, Callable[..., Tuple[torch.Tensor, ...]]] = {
    "sr_f32": _sr, "sr_bf16": _sr, "sr_f16": _sr,
    "sr_update": _sr_update,
    "int8_matvec": lambda x, w_q, s, gs: (int8.int8_matmul(x, w_q, s, gs),),
    "int8_matvec_t": lambda x, w_q, s, gs: (int8.int8_matmul(x, w_q, s, gs, transpose=True),),
    "int8_blocked": lambda x, w_q, s, gs: (int8.int8_matmul(x, w_q, s, gs),),
    "int8_blocked_t": lambda x, w_q, s, gs: (int8.int8_matmul(x, w_q, s, gs, transpose=True),),
    "int4_quant": lambda x, gs: tuple(int4.quantize_int4(x, gs)),
    "int4_dequant": lambda p, s, z, gs: (int4.dequantize_int4(p, s, z, gs, (96, 128)),),
    "int4_matmul": lambda x, p, s, z, gs: (int4.int4_matmul(x, p, s, z, gs, (96, 128)),),
    "galore_left_f32": _galore, "galore_right_bf16": _galore,
    "adam8bit": _adam8bit,
    "memory_f32": _memory, "memory_bf16": _memory,
    "bitmask_few_bf16": _bitmask, "bitmask_many_f32": _bitmask,
}
# Cases whose cpu kernels are specified to match the reference bit for bit (the rest differ from the reference by
# rounding: different summation orders; they are compared across torch releases only).
EXACT = ("sr_f32", "sr_bf16", "sr_f16", "sr_update", "int4_quant", "int4_dequant", "adam8bit")


def run(inputs: Dict[str, tuple], backend: str = "cpu") -> Dict[str, Tuple[torch.Tensor, ...]]:
    with use_backend(backend):
        return {name: CASES[name](*args) for name, args in inputs.items()}


def differences(a: Dict[str, tuple], b: Dict[str, tuple], names) -> Dict[str, str]:
    out = {}
    for name in names:
        for i, (x, y) in enumerate(zip(a[name], b[name])):
            if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x, y):
                err = (x.double() - y.double()).abs().max().item() if x.shape == y.shape else "shape"
                out[f"{name}[{i}]"] = f"max |diff| {err}"
    return out


def main(path: str) -> int:
    saved = torch.load(path, weights_only=True)
    ours = run(saved["inputs"], "cpu")
    reference = run({n: saved["inputs"][n] for n in EXACT}, "reference")
    report = {
        "torch": torch.__version__,
        "saved_by_torch": saved["torch"],
        "library": native.CPU_PATH,
        "library_error": native.CPU_ERROR,
        "cases": len(ours),
        "differ_from_saved": differences(ours, saved["outputs"], ours),
        "differ_from_reference": differences(ours, reference, EXACT),
    }
    print(json.dumps(report))
    return 0 if native.CPU is not None and not report["differ_from_saved"] and not report["differ_from_reference"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
