"""A tuned launch's first call (kernels/_shared.py, Launcher.choose; GaLore's matmul, kernels/galore.py), where it is
not an ordinary one:

* inside a CUDA-graph capture: the autotuner must not time configs there, since its synchronizations invalidate the
  caller's capture. The call runs the first config the pruner keeps, untimed, and records neither the config nor the
  plan, so the bucket's first call outside a capture tunes as usual (Launcher.provisional);
* from two threads at once (nn.DataParallel's replicas, a threaded server): a Triton autotuner keeps the call it
  tunes on itself, so tunings run one at a time (TUNE_LOCK), each bucket getting a config of its own pruning.

Triton's JIT path does not run under the interpreter, so the checks run in a child process without TRITON_INTERPRET
on the stand-in driver (tests/fake_triton_gpu.py: real sm_90 compiles, launches and benchmarks counted, nothing run),
with ``capturing()`` answered by the test. What a capture on a GPU does with it is tests/test_cuda_graphs.py's
``test_first_call_inside_capture_tunes_later``."""

import json
import threading
import time

import pytest
import torch
import triton
import triton.language as tl

from tests.fake_triton_gpu import run_child

pytestmark = pytest.mark.triton_kernels


@triton.jit
def _copy_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)


def _two_threads(fake):
    """Two threads tune two buckets of one Launcher at once (the small bucket's pruning keeps BLOCK 64 and 128, the
    large one's 256 and 512); each timing sleeps 30 ms, leaving the GIL. Returns whether timings of the two threads
    overlapped in time, and each bucket's chosen BLOCK."""
    from weightkit.kernels import _shared

    configs = [_shared.config(4, 1, BLOCK=b) for b in (64, 128, 256, 512)]
    launcher = _shared.Launcher(_copy_kernel, configs, key=["n"], prune=lambda configs, named_args, **kw: [
        c for c in configs if (c.kwargs["BLOCK"] <= 128) == (named_args["n"] < 1000)])
    spans, real_bench = [], triton.testing.do_bench

    def sleepy(fn, *args, **kwargs):
        start = time.monotonic()
        time.sleep(0.03)
        out = real_bench(fn, *args, **kwargs)
        spans.append((threading.current_thread().name, start, time.monotonic()))
        return out

    triton.testing.do_bench = sleepy
    barrier, chosen = threading.Barrier(2), {}

    def tune(name, n):
        x = torch.randn(n)
        barrier.wait()
        cfg, _ = launcher.choose(name, lambda c: (triton.cdiv(n, c["BLOCK"]),), (x, torch.empty_like(x), n), {})
        chosen[name] = cfg.kwargs["BLOCK"]

    threads = [threading.Thread(target=tune, args=a, name=a[0]) for a in (("small", 700), ("large", 5000))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    triton.testing.do_bench = real_bench
    overlap = any(a[0] != b[0] and a[1] < b[2] and b[1] < a[2] for a in spans for b in spans)
    return dict(overlap=overlap, chosen=chosen, timed=len(spans))


def _child_main():
    from tests import fake_triton_gpu
    from weightkit.kernels import _shared, galore, int8, memoryformer

    fake = fake_triton_gpu.install()
    state = {"capturing": True}
    _shared.capturing = galore.capturing = lambda: state["capturing"]
    out = {}

    def counts(before):
        return dict(timed=fake.benchmarks - before[0], launches=fake.launches - before[1])

    def run(name, call, launchers):
        for phase in ("capture", "eager", "capture again"):
            state["capturing"] = phase != "eager"
            before = (fake.benchmarks, fake.launches)
            call()
            out[f"{name}: {phase}"] = dict(counts(before), chosen=sum(len(la.chosen) for la in launchers),
                                           plans=sum(len(la.plans) for la in launchers))

    torch.manual_seed(0)
    # int8_matmul at a tuned size (2^20 weight elements): the GEMV (2 tokens) and the tensor-core kernel (64 tokens)
    w_q = torch.randint(-127, 128, (1024, 1024), dtype=torch.int8)
    scale = torch.rand(1024, 8) + 0.5
    for tokens, launcher in ((2, int8._MATMUL.ops[False].gemv), (64, int8._MATMUL.ops[False].mm)):
        x = torch.randn(tokens, 1024, dtype=torch.bfloat16)
        run(f"int8 {tokens} tokens", lambda: int8.int8_matmul_triton(x, w_q, scale, 128, False), [launcher])
    # MemoryLinear's forward at a tuned size (2^22 table elements), bf16 tables: the tuning branch of _launch_forward
    x = torch.randn(4, 1024, dtype=torch.bfloat16)
    tables = torch.randn(128, 256, 128, dtype=torch.bfloat16)
    state["capturing"] = True
    before = (fake.benchmarks, fake.launches)
    memoryformer.memory_lookup_forward_triton(x, tables, 1.0)
    out["memoryformer forward: capture"] = dict(counts(before), chosen=len(memoryformer._FWD.chosen),
                                                plans=len(memoryformer._FWD.plans))
    # GaLore's fused update (its own triton.autotune): the matmul launched untimed, no tuning key recorded
    m, n, r = 256, 192, 32
    weight, low = torch.randn(m, n), torch.randn(r, n)
    ortho = torch.linalg.qr(torch.randn(m, r))[0].contiguous()
    before = (fake.benchmarks, fake.launches)
    galore.galore_adam_update_triton(weight, low, torch.zeros(r, n), torch.zeros(r, n), ortho, True, 0.9, 0.999,
                                     1e-8, 1e-2, 0.25, 1.0)
    out["galore: capture"] = dict(counts(before), recorded=len(galore._TUNED))
    state["capturing"] = False
    before = (fake.benchmarks, fake.launches)
    galore.galore_adam_update_triton(weight, low, torch.zeros(r, n), torch.zeros(r, n), ortho, True, 0.9, 0.999,
                                     1e-8, 1e-2, 0.25, 1.0)
    out["galore: eager"] = dict(counts(before), recorded=len(galore._TUNED))
    state["capturing"] = False
    out["two threads"] = _two_threads(fake)
    print(json.dumps(out))


def _child():
    return run_child(__file__)


@pytest.fixture(scope="module")
def child_out():
    return _child()


def test_first_call_inside_capture_runs_untimed_and_records_nothing(child_out):
    out = child_out
    for tokens in (2, 64):
        name = f"int8 {tokens} tokens"
        # inside the capture: one launch, nothing timed, nothing recorded
        assert out[f"{name}: capture"] == dict(timed=0, launches=1, chosen=0, plans=0), out
        # the first eager call tunes (times more than one config) and records the config and the plan
        eager = out[f"{name}: eager"]
        assert eager["timed"] > 1 and eager["chosen"] == 1 and eager["plans"] == 1, out
        # a later capture replays the tuned plan: no timing
        assert out[f"{name}: capture again"] == dict(timed=0, launches=1, chosen=1, plans=1), out
    assert out["memoryformer forward: capture"] == dict(timed=0, launches=1, chosen=0, plans=0), out
    # GaLore: the Adam kernel and the matmul, nothing timed nor recorded; then the eager call tunes the matmul
    assert out["galore: capture"] == dict(timed=0, launches=2, recorded=0), out
    assert out["galore: eager"]["timed"] > 1 and out["galore: eager"]["recorded"] == 1, out


def test_two_threads_tune_one_after_the_other(child_out):
    out = child_out["two threads"]
    # both buckets timed both their configs, never at the same time, and each chose one of its own configs
    assert out["timed"] == 4 and not out["overlap"], out
    assert out["chosen"]["small"] in (64, 128) and out["chosen"]["large"] in (256, 512), out


if __name__ == "__main__":
    _child_main()
