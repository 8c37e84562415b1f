"""Calls without tokens (an empty batch, which nn.Linear takes: a routed expert that got no token, an empty last
batch): every token-wise op (int8_matmul, int4_matmul, memory_lookup, dict_bitmask_matmul) on every backend gives an
empty output of the right shape and dtype, and its backward an empty input gradient and zero gradients of the
operands the tokens sum into (MemoryFormer's tables, the dictionary's values), as autograd gives nn.Linear's weight.
No kernel runs (define's ``empty``). The same through the dispatcher (opcheck: fake, autograd registration) and
torch.compile. Ops over a whole tensor (quantize, stochastic rounding, the optimizer updates) still reject an empty
one (tests/ops/test_int8_ops.py::test_sr_bad_input)."""

import pytest
import torch

from tests.conftest import DEVICES, usable_backends
from weightkit import use_backend
from weightkit.ops import dictionary, int4, int8, memoryformer
from weightkit.ops.dictionary import dict_bitmask_matmul, index_dtype_for, pack_bitmask
from weightkit.ops.int4 import int4_matmul, quantize_int4
from weightkit.ops.int8 import absmax_scale, int8_matmul, stochastic_round_int8
from weightkit.ops.memoryformer import memory_lookup


def _int8(device):
    w = torch.randn(16, 32, device=device)
    scale = absmax_scale(w, 8)
    return stochastic_round_int8(w, scale, 8, 1, 0), scale


def _bitmask(device, k=40, s=4, d_out=9):
    g = torch.Generator().manual_seed(4)
    idx = torch.stack([torch.randperm(k, generator=g)[:s] for _ in range(d_out)], 1)
    bitmask, values, offsets = pack_bitmask(idx.to(index_dtype_for(k)).to(device),
                                            torch.randn(s, d_out, generator=g).to(device), k)
    return values, bitmask, offsets


# op -> (its kernel table, device -> (x's feature count, f(x) -> y, the operands that take a gradient))
def _cases(device):
    w_q, scale = _int8(device)
    packed = quantize_int4(torch.randn(12, 8, device=device), 4)
    tables = (torch.randn(2, 16, 8, device=device) * 0.1).requires_grad_()
    values, bitmask, offsets = _bitmask(device)
    values = values.requires_grad_()
    return {
        "int8_matmul": (int8._INT8_MM, 32, lambda x: int8_matmul(x, w_q, scale, 8), ()),
        "int8_matmul transposed": (int8._INT8_MM, 16, lambda x: int8_matmul(x, w_q, scale, 8, transpose=True), ()),
        "int4_matmul": (int4._MM, 8, lambda x: int4_matmul(x, *packed, 4, (12, 8)), ()),
        "int4_matmul float32 out": (int4._MM, 8, lambda x: int4_matmul(x, *packed, 4, (12, 8),
                                                                         out_dtype=torch.float32), ()),
        "memory_lookup": (memoryformer._FWD, 8, lambda x: memory_lookup(x, tables, 0.5), (tables,)),
        "dict_bitmask_matmul": (dictionary._BM_FWD, 40, lambda x: dict_bitmask_matmul(
            x.reshape(-1, x.shape[-1]), values, bitmask, offsets), (values,)),
    }


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(_cases("cpu")))
def test_an_empty_batch_gives_an_empty_output_and_zero_gradients(device, dtype, name, monkeypatch):
    table, features, fn, operands = _cases(device)[name]
    tables = (int8._INT8_MM, int4._MM, memoryformer._FWD, memoryformer._BWD, dictionary._BM_FWD, dictionary._BM_BWD)
    calls = []

    def count_kernel_calls():  # every backend of every token-wise op: the empty calls must not reach one
        for t in tables:
            for backend, impl in list(t.impls.items()):
                monkeypatch.setitem(t.impls, backend, lambda *a, _impl=impl, _n=f"{t.name} {backend}": (
                    calls.append(_n), _impl(*a))[1])
            t._chosen.clear()

    ran = False
    for backend in usable_backends(table, device):
        with use_backend(backend):
            for lead in [(0,), (3, 0)]:
                if name == "dict_bitmask_matmul" and len(lead) > 1:
                    continue  # (a 2-D op)
                full = torch.randn(2, features, device=device).to(dtype)
                want = fn(full)  # shape and dtype of a non-empty call's output
                x = torch.randn(*lead, features, device=device).to(dtype).requires_grad_()
                for t in operands:
                    t.grad = None
                count_kernel_calls()
                y = fn(x)
                assert y.shape == (*lead, want.shape[-1]), (backend, name, y.shape)
                assert y.dtype == want.dtype and y.device == x.device, (backend, name)
                y.sum().backward()
                monkeypatch.undo()
                assert not calls, (backend, name, calls)  # no kernel ran, forward or backward
                assert x.grad.shape == x.shape and x.grad.dtype == dtype, (backend, name)
                for t in operands:
                    assert t.grad is not None and t.grad.shape == t.shape, (backend, name)
                    assert not t.grad.any(), (backend, name)  # nothing summed into them
                ran = True
    assert ran


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batches_through_the_dispatcher_and_compile(device):
    w_q, scale = _int8(device)
    packed = quantize_int4(torch.randn(12, 8, device=device), 4)
    tables = torch.randn(2, 16, 8, device=device) * 0.1
    values, bitmask, offsets = _bitmask(device)
    x = lambda f: torch.randn(0, f, device=device).requires_grad_()  # noqa: E731
    for op, args in [
        ("int8_matmul", (x(32), w_q, scale, 8, False)),
        ("int4_matmul", (x(8).to(torch.bfloat16), *packed, 4, [12, 8], False, torch.float32)),
        ("memory_lookup_forward", (x(8), tables.requires_grad_(), 0.5)),
        ("dict_bitmask_matmul", (x(40), values.requires_grad_(), bitmask, offsets)),
    ]:
        torch.library.opcheck(getattr(torch.ops.weightkit, op).default, args)

    @torch.compile(backend="eager", fullgraph=True)
    def f(t):
        return int8_matmul(t, w_q, scale, 8) * 2

    assert f(torch.randn(0, 32, device=device)).shape == (0, 16)
    assert f(torch.randn(3, 32, device=device)).shape == (3, 16)
