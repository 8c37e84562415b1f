"""Property tests (hypothesis) across shapes, dtypes, layouts and arguments: every backend == the reference
(bit for bit where the op's spec says so, else within a per-dtype tolerance of a float64 evaluation).

The number of examples per property is set by ``WEIGHTKIT_HYPOTHESIS_EXAMPLES`` (default 25, so CI stays fast;
raise it for a fuzzing run). With ``WEIGHTKIT_FUZZ_REPORT=path.json`` the counts of cases tried per property and
per backend are written there at the end of the session (the README quotes one such run).
"""

import atexit
import collections
import json
import os

import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tests.conftest import assert_quantized_matmul_contract, usable_backends
from weightkit import use_backend
from weightkit.ops import dictionary, galore, int4, memoryformer, int8

EXAMPLES = int(os.environ.get("WEIGHTKIT_HYPOTHESIS_EXAMPLES", "25"))
CASES = collections.Counter()


def _write_report():
    path = os.environ.get("WEIGHTKIT_FUZZ_REPORT")
    if path and CASES:
        report = {"examples_per_property": EXAMPLES, "cases": dict(sorted(CASES.items())),
                  "total_backend_comparisons": sum(v for k, v in CASES.items() if "/" in k)}
        with open(path, "w") as f:
            json.dump(report, f, indent=1)


atexit.register(_write_report)
SETTINGS = settings(max_examples=EXAMPLES, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
DTYPES = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])


def _backends_agree(table, fn, *args):
    with use_backend("reference"):
        expected = fn(*args)
    CASES[table.name] += 1
    for name in usable_backends(table, "cpu"):
        with use_backend(name):
            got = fn(*args)
        CASES[f"{table.name}/{name}"] += 1
        yield name, got, expected


def _maybe_transposed(t: torch.Tensor, transposed: bool) -> torch.Tensor:
    """``t`` itself, or the same values held in a non-contiguous (transposed) layout."""
    return t.T.contiguous().T if transposed and t.dim() == 2 else t


TOL = {torch.float32: dict(rtol=2e-5, atol=2e-5), torch.bfloat16: dict(rtol=3e-2, atol=3e-2),
       torch.float16: dict(rtol=3e-3, atol=3e-3)}


@SETTINGS
@given(
    groups=st.integers(1, 12),
    group_size=st.sampled_from([1, 2, 3, 8, 32, 100]),
    dtype=DTYPES,
    magnitude=st.floats(1e-3, 1e3),
    seed=st.integers(0, 2**63 - 1),
    offset=st.integers(0, 2**40),
    torch_seed=st.integers(0, 2**32 - 1),
)
def test_stochastic_round_int8_backends_agree(groups, group_size, dtype, magnitude, seed, offset, torch_seed):
    torch.manual_seed(torch_seed)  # inputs are a function of the example: failures replay
    x = (torch.randn(groups * group_size) * magnitude).to(dtype)
    scale = int8.absmax_scale(x, group_size)
    for name, got, expected in _backends_agree(int8._SR, int8.stochastic_round_int8, x, scale, group_size, seed,
                                               offset):
        assert torch.equal(got, expected), name
        # never more than one step away from x / scale
        steps = x.float().reshape(-1, group_size) / scale[:, None]
        assert bool(((got.float().reshape(-1, group_size) - steps).abs() <= 1 + 1e-4).all()), name


@SETTINGS
@given(tokens=st.integers(1, 20), out_f=st.integers(1, 40), groups_per_row=st.integers(1, 3),
       group_size=st.sampled_from([2, 4, 16, 32]), dtype=DTYPES, transpose=st.booleans(), strided=st.booleans(),
       torch_seed=st.integers(0, 2**32 - 1))
def test_int8_matmul_backends_match_float64(tokens, out_f, groups_per_row, group_size, dtype, transpose, strided,
                                            torch_seed):
    torch.manual_seed(torch_seed)  # inputs are a function of the example: failures replay
    in_f = groups_per_row * group_size
    w = torch.randn(out_f, in_f)
    scale = int8.absmax_scale(w, group_size)
    q = int8.stochastic_round_int8(w, scale, group_size, seed=1)
    x = _maybe_transposed(torch.randn(tokens, out_f if transpose else in_f).to(dtype), strided)
    w64 = int8.dequantize_int8(q, scale, group_size).double()
    for name, got, _ in _backends_agree(int8._INT8_MM, int8.int8_matmul, x, q, scale, group_size, transpose):
        assert_quantized_matmul_contract(got, x, w64, transpose, name)  # the op's precision contract


@SETTINGS
@given(groups=st.integers(1, 10), group_size=st.sampled_from([1, 2, 5, 32, 64]), delta_dtype=DTYPES,
       decay=st.sampled_from([1.0, 0.999, 0.5]), magnitude=st.floats(1e-4, 10.0), seed=st.integers(0, 2**63 - 1),
       offset=st.integers(0, 2**40), torch_seed=st.integers(0, 2**32 - 1))
def test_int8_sr_update_backends_bit_identical(groups, group_size, delta_dtype, decay, magnitude, seed, offset,
                                               torch_seed):
    torch.manual_seed(torch_seed)  # inputs are a function of the example: failures replay
    w = torch.randn(groups * group_size)
    scale0 = int8.absmax_scale(w, group_size)
    q0 = int8.stochastic_round_int8(w, scale0, group_size, seed=7)
    delta = (torch.randn(w.shape) * magnitude).to(delta_dtype)
    results = {}
    CASES["int8_sr_update_"] += 1
    for name in usable_backends(int8._SR_UPDATE, "cpu"):
        q, sc = q0.clone(), scale0.clone()
        with use_backend(name):
            int8.int8_sr_update_(q, sc, delta, group_size, decay=decay, seed=seed, offset=offset)
        CASES[f"int8_sr_update_/{name}"] += 1
        results[name] = (q, sc)
    q_ref, s_ref = results["reference"]
    for name, (q, sc) in results.items():
        assert torch.equal(q, q_ref) and torch.equal(sc, s_ref), name
    target = (int8.dequantize_int8(q0, scale0, group_size) + delta.float()) * decay
    err = (int8.dequantize_int8(q_ref, s_ref, group_size) - target).reshape(-1, group_size).abs()
    assert bool((err <= s_ref[:, None] * (1 + 1e-5)).all())  # within one step of the exact update


@SETTINGS
@given(rows=st.integers(1, 24), cols=st.integers(1, 24), group_size=st.sampled_from([2, 4, 6, 16]), dtype=DTYPES,
       magnitude=st.floats(1e-3, 1e3), shift=st.floats(-2.0, 2.0), torch_seed=st.integers(0, 2**32 - 1))
def test_int4_quantize_backends_bit_identical(rows, cols, group_size, dtype, magnitude, shift, torch_seed):
    torch.manual_seed(torch_seed)  # inputs are a function of the example: failures replay
    n = rows * cols
    assume(n % group_size == 0)
    x = ((torch.randn(n) + shift) * magnitude).to(dtype)
    for name, got, expected in _backends_agree(int4._QUANT, int4.quantize_int4, x, group_size):
        for a, b in zip(got, expected):
            assert torch.equal(a, b), name
    packed, scale, zero = int4.quantize_int4(x, group_size)
    back = int4.dequantize_int4(packed, scale, zero, group_size, x.shape)
    err = (back.double() - x.double()).reshape(-1, group_size).abs()
    assert bool((err <= scale.double()[:, None] * (1 + 1e-6)).all())


@SETTINGS
@given(rows=st.integers(1, 24), cols=st.integers(1, 24), group_size=st.sampled_from([2, 4, 8]),
       tokens=st.integers(1, 12), dtype=DTYPES, transpose=st.booleans(), strided=st.booleans(),
       torch_seed=st.integers(0, 2**32 - 1))
def test_int4_matmul_backends_match_float64(rows, cols, group_size, tokens, dtype, transpose, strided, torch_seed):
    torch.manual_seed(torch_seed)  # inputs are a function of the example: failures replay
    assume((rows * cols) % group_size == 0)
    w = torch.randn(rows, cols)
    packed, scale, zero = int4.quantize_int4(w, group_size)
    w64 = int4.dequantize_int4(packed, scale, zero, group_size, (rows, cols)).double()
    x = _maybe_transposed(torch.randn(tokens, rows if transpose else cols).to(dtype), strided)
    for name, got, _ in _backends_agree(int4._MM, int4.int4_matmul, x, packed, scale, zero, group_size,
                                        (rows, cols), transpose):
        assert_quantized_matmul_contract(got, x, w64, transpose, name)  # the op's precision contract


@SETTINGS
@given(m=st.integers(2, 24), n=st.integers(2, 24), rank_frac=st.floats(0.1, 1.0), left=st.booleans(),
       wdtype=DTYPES, step=st.integers(1, 50), decay=st.sampled_from([1.0, 0.99]),
       torch_seed=st.integers(0, 2**32 - 1))
def test_galore_adam_update_backends_match(m, n, rank_frac, left, wdtype, step, decay, torch_seed):
    torch.manual_seed(torch_seed)  # inputs are a function of the example: failures replay
    r = max(1, int(min(m, n) * rank_frac))
    ortho = torch.linalg.qr(torch.randn(m if left else n, r))[0]
    ortho = ortho.contiguous() if left else ortho.T.contiguous()
    low = torch.randn((r, n) if left else (m, r))
    m0, v0 = torch.randn(low.shape) * 0.1, torch.rand(low.shape) * 0.1
    w0 = torch.randn(m, n).to(wdtype)
    kw = dict(beta1=0.9, beta2=0.999, eps=1e-6, step_size=1e-2 / step, scale=0.25, decay=decay)
    outs = {}
    CASES["galore_adam_update_"] += 1
    for name in usable_backends(galore._GALORE, "cpu"):
        w, ma, va = w0.clone(), m0.clone(), v0.clone()
        with use_backend(name):
            galore.galore_adam_update_(w, low, ma, va, ortho, left, **kw)
        CASES[f"galore_adam_update_/{name}"] += 1
        outs[name] = (w, ma, va)
    w_ref, m_ref, v_ref = outs["reference"]
    for name, (w, ma, va) in outs.items():
        # moments: a few ulps apart (the kernels may order (1 - beta2) g g differently from addcmul)
        torch.testing.assert_close(ma, m_ref, rtol=1e-5, atol=1e-7, msg=lambda s: f"{name} exp_avg: {s}")
        torch.testing.assert_close(va, v_ref, rtol=1e-5, atol=1e-7, msg=lambda s: f"{name} exp_avg_sq: {s}")
        torch.testing.assert_close(w.double(), w_ref.double(), **TOL[wdtype], msg=lambda s: f"{name} weight: {s}")


@SETTINGS
@given(tokens=st.integers(1, 16), k=st.integers(1, 4), tau=st.integers(1, 6), d_out=st.integers(1, 12),
       dtype=DTYPES, t=st.floats(0.25, 4.0), zeros=st.booleans(), torch_seed=st.integers(0, 2**32 - 1))
def test_memory_lookup_backends_match_float64(tokens, k, tau, d_out, dtype, t, zeros, torch_seed):
    torch.manual_seed(torch_seed)  # inputs are a function of the example: failures replay
    x = torch.randn(tokens, k * tau)
    if zeros:
        x[x.abs() < 0.3] = 0.0  # exact zeros: the hash's tie rule
    x = x.to(dtype)
    tables = torch.randn(k, 2**tau, d_out).to(dtype)
    want = memoryformer.memory_lookup_reference(x.double(), tables.double(), t)
    for name, got, _ in _backends_agree(memoryformer._FWD, memoryformer.memory_lookup, x, tables, t):
        torch.testing.assert_close(got.double(), want, **TOL[dtype], msg=lambda m: f"{name}: {m}")
    g = torch.randn(tokens, d_out).to(dtype)
    for name, (gx, gt), (gx_ref, gt_ref) in _backends_agree(memoryformer._BWD, memoryformer.memory_lookup_grads, g, x, tables,
                                                           t, True):
        torch.testing.assert_close(gx.double(), gx_ref.double(), **TOL[dtype], msg=lambda m: f"{name} grad_x: {m}")
        torch.testing.assert_close(gt.double(), gt_ref.double(), **TOL[dtype], msg=lambda m: f"{name} grad_t: {m}")


@SETTINGS
@given(tokens=st.integers(1, 48), k=st.integers(1, 200), s_frac=st.floats(0.0, 1.0), d_out=st.integers(1, 300),
       dtype=DTYPES, values_dtype=DTYPES, strided=st.booleans(), torch_seed=st.integers(0, 2**32 - 1))
def test_dict_bitmask_matmul_backends_match_float64(tokens, k, s_frac, d_out, dtype, values_dtype, strided,
                                                    torch_seed):
    """Every backend of dict_bitmask_matmul (forward and both gradients) against a float64 evaluation; tokens span
    the cpu backend's direct and dense paths, k words with and without a partial last word, s from 1 to k."""
    torch.manual_seed(torch_seed)  # inputs are a function of the example: failures replay
    s = max(1, round(s_frac * k))
    indices = torch.rand(k, d_out).argsort(0)[:s]
    bitmask, values, offsets = dictionary.pack_bitmask(indices, torch.randn(s, d_out), k)
    values = _maybe_transposed(values.to(values_dtype), strided)
    z = _maybe_transposed(torch.randn(tokens, k).to(dtype), strided)
    g = torch.randn(tokens, d_out).to(dtype)
    z64 = z.double().requires_grad_(True)
    v64 = values.double().requires_grad_(True)
    dense64 = torch.zeros(k, d_out, dtype=torch.float64).scatter(0, indices.sort(0).values, v64)
    y64 = z64 @ dense64
    gz64, gv64 = torch.autograd.grad(y64, (z64, v64), g.double())
    # fp32 accumulation over k (forward, grad_values over tokens) or d_out (grad_z) terms, then rounding to the dtype
    tol = max(TOL[dtype]["rtol"], TOL[values_dtype]["rtol"])
    CASES["dict_bitmask_matmul"] += 1
    for name in usable_backends(dictionary._BM_FWD, "cpu"):
        with use_backend(name):
            z_ = z.detach().clone().requires_grad_(True)
            v_ = values.detach().clone().requires_grad_(True)
            y = dictionary.dict_bitmask_matmul(z_, v_, bitmask, offsets)
            y.backward(g)
        CASES[f"dict_bitmask_matmul/{name}"] += 1
        assert y.dtype == z_.grad.dtype == dtype and v_.grad.dtype == values_dtype, name
        torch.testing.assert_close(y.double(), y64.detach(), rtol=tol, atol=tol * (1 + s ** 0.5),
                                   msg=lambda m: f"{name} y: {m}")
        torch.testing.assert_close(z_.grad.double(), gz64, rtol=tol, atol=tol * (1 + d_out ** 0.5),
                                   msg=lambda m: f"{name} grad z: {m}")
        torch.testing.assert_close(v_.grad.double(), gv64, rtol=tol, atol=tol * (1 + tokens ** 0.5),
                                   msg=lambda m: f"{name} grad values: {m}")
