"""weightkit.ops._registry: every op is torch.ops.weightkit.<name>, defined once. The Python entry's shortcut (plain
eager calls skip the dispatcher) gives the same outputs, gradients and version bumps as the dispatcher, and steps
aside for dispatch modes, fake tensors, vmap and torch.compile (training included)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from weightkit.ops import _registry
from weightkit.ops.dictionary import dict_bitmask_matmul, pack_bitmask
from weightkit.ops.int4 import int4_matmul, quantize_int4
from weightkit.ops.memoryformer import memory_lookup
from weightkit.ops.int8 import absmax_scale, int8_matmul, int8_sr_update_, stochastic_round_int8

DIFFERENTIABLE = ["int8_matmul", "int4_matmul", "memory_lookup_forward", "dict_bitmask_matmul"]
OTHERS = ["stochastic_round_int8", "int8_sr_update_", "quantize_int4", "dequantize_int4", "galore_adam_update_",
          "lowrank_update_", "memory_lookup_backward", "dict_bitmask_matmul_backward"]


def test_every_op_is_registered_once_with_fake_and_autograd():
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    for name in DIFFERENTIABLE + OTHERS:
        op = getattr(torch.ops.weightkit, name).default
        qualname = f"weightkit::{name}"
        assert has(qualname, "CompositeExplicitAutograd"), name
        assert has(qualname, "Meta"), name  # the fake kernel (register_fake)
        assert has(qualname, "Autograd") == (name in DIFFERENTIABLE), name
        assert op._schema.is_mutable == name.endswith("_"), name


@pytest.fixture(params=[True, False], ids=["shortcut", "dispatcher"])
def path(request, monkeypatch):
    if request.param and not _registry.FAST_PATH:
        pytest.skip("this torch lacks a function the shortcut needs: every call goes through the dispatcher")
    monkeypatch.setattr(_registry, "FAST_PATH", request.param)
    return request.param


def _cases():
    torch.manual_seed(0)
    w = torch.randn(16, 32)
    q = torch.randint(-127, 128, (16, 32), dtype=torch.int8)
    scale = absmax_scale(w, 8)
    packed, s4, z4 = quantize_int4(torch.randn(12, 8), 4)
    z = torch.randn(5, 20)
    values = torch.randn(4, 9)
    bitmask, values, offsets = pack_bitmask(torch.rand(20, 9).argsort(0)[:4].to(torch.uint8), values, 20)
    return [
        ("int8_matmul", lambda a: int8_matmul(a, q, scale, 8), torch.randn(3, 2, 32), ()),
        ("int4_matmul", lambda a: int4_matmul(a, packed, s4, z4, 4, (12, 8)), torch.randn(3, 8), ()),
        ("memory_lookup", lambda a, t: memory_lookup(a, t, 0.9), torch.randn(6, 16), (torch.randn(2, 256, 8),)),
        ("dict_bitmask_matmul", lambda a, v: dict_bitmask_matmul(a, v, bitmask, offsets), z, (values,)),
    ]


def test_both_paths_give_identical_outputs_and_gradients(path):
    for name, fn, x, params in _cases():
        with torch.no_grad():
            y_plain = fn(x, *params)
        leaves = [t.clone().requires_grad_(True) for t in (x, *params)]
        y = fn(*leaves)
        assert y.grad_fn is not None, name
        g = torch.randn_like(y)
        grads = torch.autograd.grad(y, leaves, g)
        with torch.no_grad():
            _registry.FAST_PATH = False  # the dispatcher, as reference (the fixture restores the flag)
            y_ref = fn(x, *params)
        leaves_ref = [t.clone().requires_grad_(True) for t in (x, *params)]
        grads_ref = torch.autograd.grad(fn(*leaves_ref), leaves_ref, g)
        _registry.FAST_PATH = path
        assert torch.equal(y_plain, y_ref) and torch.equal(y.detach(), y_ref), name
        for a, b in zip(grads, grads_ref):
            assert torch.equal(a, b), name


def test_in_place_op_bumps_versions(path):
    w = torch.randn(4, 16)
    scale = absmax_scale(w, 8)
    q = stochastic_round_int8(w, scale, 8, seed=1)
    versions = (q._version, scale._version)
    int8_sr_update_(q, scale, torch.randn(4, 16), 8, seed=2)
    assert q._version > versions[0] and scale._version > versions[1]
    # autograd notices: a tensor saved for backward and then updated in place fails loudly
    x = torch.randn(3, 16, requires_grad=True)
    y = int8_matmul(x, q, scale, 8)  # saves q and scale
    int8_sr_update_(q, scale, torch.randn(4, 16), 8, seed=3)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_dispatch_modes_see_the_op():
    for name, fn, x, params in _cases():
        for grad in (False, True):
            leaves = [t.clone().requires_grad_(grad) for t in (x, *params)]
            with _Recorder() as rec:
                fn(*leaves)
            op = {"memory_lookup": "memory_lookup_forward"}.get(name, name)
            assert f"weightkit.{op}.default" in rec.ops, (name, grad, rec.ops)


def test_fake_tensors_go_to_the_fake_kernel_with_its_checks():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(5, 3, 32)
        q = torch.empty(16, 32, dtype=torch.int8)
        assert int8_matmul(x, q, torch.empty(64), 8).shape == (5, 3, 16)
        assert memory_lookup(torch.empty(7, 16), torch.empty(2, 256, 8)).shape == (7, 8)
        with pytest.raises(ValueError, match="scale must hold 64 values"):
            int8_matmul(x, q, torch.empty(3), 8)


def test_vmap_over_an_op():
    q = torch.randint(-127, 128, (16, 32), dtype=torch.int8)
    scale = torch.rand(64) + 0.1
    xb = torch.randn(3, 4, 32)
    yv = torch.vmap(lambda t: int8_matmul(t, q, scale, 8))(xb)  # slice by slice (torch's batching fallback)
    assert torch.equal(yv, torch.stack([int8_matmul(t, q, scale, 8) for t in xb]))


@pytest.mark.parametrize("name", ["int8_matmul", "memory_lookup", "dict_bitmask_matmul"])
def test_compiled_training_matches_eager(name):
    fn, x, params = next((f, x, p) for n, f, x, p in _cases() if n == name)

    def loss(*leaves):
        return (fn(leaves[0] * 2, *leaves[1:]) ** 2).sum()

    leaves = [t.clone().requires_grad_(True) for t in (x, *params)]
    want = torch.autograd.grad(loss(*leaves), leaves)
    torch._dynamo.reset()
    got = torch.autograd.grad(torch.compile(loss, backend="aot_eager", fullgraph=True)(*leaves), leaves)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_opcheck_with_gradients():
    for name, fn, x, params in _cases():
        op = {"memory_lookup": "memory_lookup_forward"}.get(name, name)
        leaves = [t.clone().requires_grad_(True) for t in (x, *params)]
        captured = {}  # the op's own arguments, as the public function passes them

        class Capture(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if str(func) == f"weightkit.{op}.default":
                    captured["args"] = args
                return func(*args, **(kwargs or {}))

        with Capture():
            fn(*leaves)
        args = tuple(a.detach().requires_grad_(a.is_floating_point()) if isinstance(a, torch.Tensor) else a
                     for a in captured["args"])
        torch.library.opcheck(getattr(torch.ops.weightkit, op).default, args)


def test_dispatcher_calls_without_trailing_defaults_see_the_whole_schema():
    """The dispatcher hands a Python kernel only the arguments its caller gave; define fills in the trailing
    defaults, so the checks, kernels and autograd formulas see the whole schema. int8_sr_lowrank_update_ called
    through torch.ops without its optional device flags still runs its on-by-default NaN check of the update and
    leaves the weight as it was (its check took the seed for found_inf before, and wrote NaN's codes), and
    int4_matmul without out_dtype gives x's dtype and its gradient."""
    from tests.ops.test_opcheck import CASES

    args = list(CASES["int8_sr_lowrank_update_"]("cpu"))
    args[5] = torch.full_like(args[5], float("nan"))
    w_q, scale = args[0].clone(), args[1].clone()
    with pytest.raises(ValueError, match="update contains 48 non-finite"):
        torch.ops.weightkit.int8_sr_lowrank_update_.default(*args)
    assert torch.equal(args[0], w_q) and torch.equal(args[1], scale)

    x, *rest = CASES["int4_matmul"]("cpu")
    x = x.to(torch.bfloat16).requires_grad_()
    y = torch.ops.weightkit.int4_matmul.default(x, *rest)  # 7 of its 8 arguments
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and x.grad.shape == x.shape
