"""A tuned launch whose first call comes inside a CUDA-graph capture (kernels/_shared.py, Launcher.provisional; GaLore's
matmul, kernels/galore.py): the autotuner must not time configs there, since its synchronizations invalidate the
caller's capture. The call runs the first config the pruner keeps, untimed, and records neither the config nor the
plan, so the bucket's first call outside a capture tunes as usual.

Triton's JIT path does not run under the interpreter, so the check runs in a child process without TRITON_INTERPRET
on the stand-in driver (tests/fake_triton_gpu.py: real sm_90 compiles, launches and benchmarks counted, nothing run),
with ``capturing()`` answered by the test. What a capture on a GPU does with it is tests/test_cuda_graphs.py's
``test_first_call_inside_capture_tunes_later``."""

import json
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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
    print(json.dumps(out))


def _child():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], capture_output=True, text=True, env=env,
                          timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_first_call_inside_capture_runs_untimed_and_records_nothing():
    out = _child()
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


if __name__ == "__main__":
    _child_main()
