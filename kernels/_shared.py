"""What the Triton kernel modules share: the interpreter switch, host integer helpers, the device guard, the launch
plumbing (configs resolved once, launch plans cached per shape), the split-K reduction, the tile helpers and the
dequantize-and-multiply GEMV/GEMM dispatch of the quantized weights.

The per-op modules (int8, int4, dictionary, memoryformer) import from here only, never from each other.

Launch plumbing (GPU-KERNELS.md sections 1 and 7): no autotuner on the call path. A ``Launcher`` holds one jitted
kernel, its config space and a module-level ``triton.autotune`` object used only to tune. The first call of a config
bucket (token count rounded up to a power of two, the other sizes, dtypes, device, flags) either tunes (on a GPU, when
the op asks for it; the autotuner launches the winner once, so that call is complete) or takes the op's shape rule;
under ``TRITON_INTERPRET=1`` every config list holds one config, taken without timing. The launch itself is then
cached per exact shape as a ``Plan`` (kernel, grid tuple, keyword arguments), and every later call is one dict lookup
and ``kernel[grid](*args, **kwargs)``. Nothing on that path tunes, syncs or reads the device, so the ops can be
captured in a CUDA graph after their first eager call; split-K partials are allocated (and, where an op needs it,
zeroed) inside the op, or, for the one-launch split-K of the int8/INT4 matmuls, taken from a buffer cached per device
and stream (SplitScratch).
"""

import contextlib
import copy
import os
import threading

import torch
import triton
import triton.language as tl
from triton.runtime.driver import driver as _DRIVER

try:
    from triton import knobs as _knobs  # Triton >= 3.4
    _RUNTIME = _knobs.runtime
except ImportError:  # no direct launches (below) on older releases
    _RUNTIME = None

# Read once: the interpreter runs CPU tensors (the tests' way without a GPU); it must be set before triton compiles.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


# -- host integers -------------------------------------------------------------------------------------------------
# ``triton.cdiv`` and ``triton.next_power_of_2`` are ``constexpr_function`` objects in recent Triton releases, whose
# ``__call__`` unwraps every argument and builds a dict per call (microseconds on a host that launches a decode
# kernel in ~10 us); the launchers use these plain functions instead.

def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints, b > 0."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << (n - 1).bit_length() if n > 1 else 1


# -- devices -------------------------------------------------------------------------------------------------------

_SAME_DEVICE = contextlib.nullcontext()


def device_guard(device):
    """A context that makes ``device`` current while a launcher runs: Triton launches on the current CUDA device, so
    a tensor on cuda:1 while cuda:0 is current must switch. Costs one current-device query when the index is the
    current one (then nothing is switched); CPU tensors (the interpreter) never query CUDA."""
    if device.type != "cuda" or device.index is None or device.index == torch.cuda.current_device():
        return _SAME_DEVICE
    return torch.cuda.device(device.index)


@triton.jit
def unless_found(mask, found_ptr, HAS_FOUND: tl.constexpr):
    """A store mask, all False where the step's device flag (one float32, GradScaler's found_inf) is set: the kernels
    of the optimizer steps then leave what they would write (weights, scales, moments) as it was."""
    if HAS_FOUND:  # (tl.where: the 3.9 interpreter cannot `&` a block with a loaded scalar)
        mask = tl.where(tl.load(found_ptr) == 0.0, mask, False)
    return mask


def capturing():
    """Whether the current CUDA stream is capturing a graph: no call may synchronize it then (not called per launch:
    only a bucket's first call asks)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


_DEVICE_INFO = {}
# the interpreter (CPU tensors) plans like an H100/H200: 132 SMs, 227 KB of shared memory per block
_INTERPRETER_DEVICE = (132, 232448)


def device_info(device):
    """(SM count, max shared memory per block in bytes) of ``device``, cached per device."""
    if device.type != "cuda":
        return _INTERPRETER_DEVICE
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _DEVICE_INFO:
        sms = torch.cuda.get_device_properties(idx).multi_processor_count
        try:
            smem = triton.runtime.driver.active.utils.get_device_properties(idx)["max_shared_mem"]
        except Exception:  # noqa: BLE001 - an older/newer driver API: assume an H100's 227 KB
            smem = 232448
        _DEVICE_INFO[idx] = (sms, smem)
    return _DEVICE_INFO[idx]


# -- configs and launch plans --------------------------------------------------------------------------------------

def config(num_warps, num_stages, **kwargs):
    return triton.Config(kwargs, num_warps=num_warps, num_stages=num_stages)


def space(full, interpreted):
    """A tuner's config list: ``full()`` compiled; under the interpreter the one config ``interpreted`` (it would
    time every config in numpy otherwise)."""
    return [interpreted] if INTERPRET else full()


# -- direct launches -----------------------------------------------------------------------------------------------
# A launch through Triton's JITFunction.run binds and specializes every argument, builds the cache key and the
# options and asks for launch metadata, on each call: half the host time of a decode op (on the 2-core CPU VM, its
# launcher doing nothing, tests/fake_triton_gpu.py: int8_matmul_triton at 4 tokens 18 us per call through run(), 8 us
# direct, with Triton 3.9 and 3.6 alike; INT4 at 1 token and MemoryLinear's forward the same). A plan's first two
# launches go through run(), the second recording what run() compiled and passed (a plan used once pays no record);
# later ones call the compiled kernel's launcher directly with the same arguments, as long as nothing run() would
# specialize differently has changed: the current device, each tensor's dtype and 16-byte alignment, every int (and
# other non-float) argument's value, and no launch hook registered (profilers: run() would build launch metadata for
# them; without hooks the launcher gets None for both, as it accepts) nor a pre-run hook of the kernel. Anything else
# takes run() again, which records anew (DIRECT_RECORDS times at most: a seed that changes with every call sends its
# plan back to run() for good). What run() also does per call and a direct launch skips: checking that the kernel's
# global variables kept their values since it was compiled. A launcher that raises on a direct launch turns them off
# for the process (one warning; the call goes through run()). WEIGHTKIT_TRITON_DIRECT_LAUNCH=0 turns them off
# (Triton < 3.4: always off).

DIRECT_LAUNCH = (not INTERPRET and _RUNTIME is not None
                 and os.environ.get("WEIGHTKIT_TRITON_DIRECT_LAUNCH", "1").strip() != "0")
DIRECT_RECORDS = 4  # records per plan: a plan whose ints change with every call (seeds) goes back to run() for good


def _no_launch_hooks():
    """No launch hook is registered (Triton's hook chains are empty; a hook set as a plain function counts)."""
    enter, leave = _RUNTIME.launch_enter_hook, _RUNTIME.launch_exit_hook
    return (enter is None or not getattr(enter, "calls", True)) and (leave is None or not getattr(leave, "calls", True))


def _guard(args, device):
    """A function (args, device) -> whether JITFunction.run would specialize a call with ``args`` on ``device`` as it
    did this one: the same device and argument count; each tensor of the same dtype and 16-byte alignment (Triton's
    pointer specialization); each float a float (not specialized by value); every other argument (ints, None, bools)
    of the same type and value. Generated as one expression, as Triton generates its binder (~0.1 us an argument)."""
    ns = {"DEVICE": device}
    terms = ["device == DEVICE", f"len(args) == {len(args)}"]
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            ns[f"D{i}"] = a.dtype
            terms += [f"args[{i}].dtype is D{i}", f"{'not ' if not a.data_ptr() & 15 else ''}args[{i}].data_ptr() & 15"]
        elif isinstance(a, float):
            terms.append(f"type(args[{i}]) is float")
        else:
            ns[f"T{i}"], ns[f"V{i}"] = type(a), a
            terms.append(f"type(args[{i}]) is T{i} and args[{i}] == V{i}")
    exec("def matches(args, device):\n    return " + " and ".join(terms), ns)  # noqa: S102 - our own text
    return ns["matches"]


def _direct_failed(exc):
    """A direct launch raised (a Triton whose launcher takes other arguments): direct launches off for the process,
    with one warning; the call goes through run() instead."""
    global DIRECT_LAUNCH
    if DIRECT_LAUNCH:
        DIRECT_LAUNCH = False
        import warnings

        warnings.warn(f"weightkit: direct Triton launches are off ({type(exc).__name__}: {exc}); every launch goes "
                      f"through JITFunction.run", RuntimeWarning, stacklevel=3)


class _Direct:
    """What a direct launch of one plan needs (recorded from its last launch through JITFunction.run)."""
    __slots__ = ("matches", "run", "function", "packed", "tail")


def _record_direct(kernel, compiled, args, kwargs):
    """The _Direct of a launch of ``kernel`` (a JITFunction) with positional ``args`` and keyword ``kwargs`` that
    JITFunction.run compiled or found as ``compiled``; None where a direct launch cannot be set up (then every call
    takes run())."""
    try:
        params = list(kernel.signature.parameters.values())
        if compiled is None or len(args) > len(params) or kernel.pre_run_hooks:
            return None
        tail = []
        for p in params[len(args):]:  # the constexprs (and defaults) run() binds after the positional arguments
            if p.kind not in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
                return None
            if p.name in kwargs:
                tail.append(kwargs[p.name])
            elif p.default is not p.empty:
                tail.append(p.default)
            else:
                return None
        d = _Direct()
        d.matches = _guard(args, _DRIVER.active.get_current_device())
        d.run, d.function, d.packed = compiled.run, compiled.function, compiled.packed_metadata
        d.tail = tuple(tail)
        return d
    except Exception:  # noqa: BLE001 - another Triton's internals: run() it is, every call
        return None


class Plan:
    """A resolved launch of ``kernel`` (a JITFunction) with ``kwargs`` (constexprs and options) on the grid tuple
    ``grid``: ``plan.launch(*args)`` (direct from its third launch, see above)."""
    __slots__ = ("kernel", "grid", "kwargs", "config", "direct", "runs", "records", "_grid3")

    def __init__(self, kernel, grid, kwargs, config):
        self.kernel, self.grid, self.kwargs, self.config = kernel, grid, kwargs, config
        self.direct = None
        self.runs = 0  # launches through run(): the first records nothing (a plan used once never pays a record)
        self.records = 0  # direct launches recorded; a plan whose calls keep changing stops after DIRECT_RECORDS
        self._grid3 = tuple(grid) + (1,) * (3 - len(grid))

    def launch(self, *args):
        d = self.direct
        if d is not None:
            active = _DRIVER.active
            device = active.get_current_device()
            if d.matches(args, device) and _no_launch_hooks() and not self.kernel.pre_run_hooks:
                g = self._grid3
                try:
                    d.run(g[0], g[1], g[2], active.get_current_stream(device), d.function, d.packed, None, None, None,
                          *args, *d.tail)
                    return
                except Exception as exc:  # noqa: BLE001 - a launcher that takes its arguments otherwise: run()
                    _direct_failed(exc)
        compiled = self.kernel[self.grid](*args, **self.kwargs)
        self.runs += 1
        if self.runs < 2:
            return
        if DIRECT_LAUNCH and self.records < DIRECT_RECORDS:  # (the global: _direct_failed may turn it off)
            self.records += 1
            self.direct = _record_direct(self.kernel, compiled, args, self.kwargs)
        else:  # an int argument that changes with every call (a seed, an offset): run() each time, no guard to pay
            self.direct = None


class Plans(dict):
    """Launch plans by exact shape key; emptied when it reaches LIMIT entries (a server that sees ever new token
    counts re-plans from the cached configs, it never re-tunes)."""
    LIMIT = 4096

    def put(self, key, plan):
        if len(self) >= self.LIMIT:
            self.clear()
        self[key] = plan
        return plan


_LAUNCH_PLANS = Plans()  # launch(): plans of untuned kernels by (kernel, grid, keyword arguments)


def launch(kernel, grid, *args, **kwargs):
    """``kernel[grid](*args, **kwargs)`` for a grid tuple and hashable keyword arguments (constexprs, options),
    through a plan cached per (kernel, grid, keyword arguments): its later launches are direct (above). For the
    kernels of an optimizer step, launched once per parameter and step."""
    key = (kernel, grid, *kwargs.items())
    plan = _LAUNCH_PLANS.get(key)
    if plan is None:
        plan = _LAUNCH_PLANS.put(key, Plan(kernel, grid, kwargs, None))
    plan.launch(*args)


def compile_threads():
    """Threads that compile a tuner's configs at once (Launcher.precompile): WEIGHTKIT_COMPILE_THREADS, else the
    CPUs this process may use, at most 16 (Triton's compiler runs mostly outside the GIL: LLVM, ptxas)."""
    env = os.environ.get("WEIGHTKIT_COMPILE_THREADS", "").strip()
    if env:
        if not env.isdigit() or int(env) < 1:
            raise ValueError(f"WEIGHTKIT_COMPILE_THREADS must be a whole number >= 1 (1: no parallel compiles), "
                             f"got {env!r}")
        return int(env)
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return min(cpus, 16)


LAUNCHERS = []  # every Launcher (tests clear their caches; bench/gpu_report.py reads the module-level autotuners)
# One tuning at a time in a process: a Triton autotuner keeps the call it tunes on itself (nargs, best_config, the
# copies restore_value writes back), so two threads tuning one launcher (nn.DataParallel's replicas, a threaded
# server's first requests) would mix their arguments; and timings taken side by side would disturb each other.
TUNE_LOCK = threading.RLock()


def tune_bench(fn, quantiles):
    """How the autotuners (every Launcher's, GaLore's) time a config: the median of 25 ms of calls after 5 ms of
    warm-up (Triton's default, 25 + 100 ms, would cost four times as long per config; tuning runs once per config
    bucket)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=5, rep=25, quantiles=quantiles)


class Launcher:
    """One jitted kernel, its config space, the config chosen per bucket and the launch plans per exact key.

    ``autotuner`` is a ``triton.autotune`` over the same kernel; it runs only when a bucket is first seen and the op
    asks for tuning (``choose`` with ``fixed=None``), never per call."""

    def __init__(self, kernel, configs, key, prune=None, **autotune_kwargs):
        self.kernel = kernel
        self.configs = configs
        prune_by = {"early_config_prune": prune} if prune is not None else None
        autotune_kwargs.setdefault("do_bench", tune_bench)
        self.autotuner = triton.autotune(configs, key=key, prune_configs_by=prune_by, **autotune_kwargs)(kernel)
        self.chosen = {}
        self.plans = Plans()
        LAUNCHERS.append(self)

    def choose(self, bucket, grid, args, meta, fixed=None):
        """(config, launched) of ``bucket``: cached; else ``fixed`` when given (launched False); else, inside a
        CUDA-graph capture, ``provisional`` (launched False); else tuned by the autotuner, which also launches the
        chosen config with ``args`` (launched True: this call's work is done)."""
        cfg = self.chosen.get(bucket)
        if cfg is not None:
            return cfg, False
        if fixed is not None:
            self.chosen[bucket] = fixed
            return fixed, False
        if capturing():
            return self.provisional(args, meta), False
        with TUNE_LOCK:
            cfg = self.chosen.get(bucket)
            if cfg is not None:  # another thread tuned the bucket meanwhile
                return cfg, False
            self.precompile(args, meta)
            self.autotuner[grid](*args, **meta)
            cfg = self.chosen[bucket] = self.autotuner.best_config
        return cfg, True

    def provisional(self, args, meta):
        """The config of a bucket's first call inside a CUDA-graph capture: the first config the pruner keeps, run
        untimed. Timing configs there would synchronize the capturing stream, which invalidates the caller's capture
        (torch.cuda.graph raises at its end). Neither it nor its plan is recorded, so the bucket's first call outside
        a capture tunes as usual; a graph captured before keeps the provisional config."""
        cfg = copy.copy(self._pruned(args, meta)[0])
        cfg.provisional = True
        return cfg

    def _pruned(self, args, meta):
        """The configs the autotuner's pruner keeps for these arguments (what it would time)."""
        tuner = self.autotuner
        with TUNE_LOCK:  # (the pruner reads the tuner's nargs)
            tuner.nargs = dict(zip(tuner.arg_names, args))
            try:
                return tuner.prune_configs(meta)
            finally:
                tuner.nargs = None

    def precompile(self, args, meta):
        """Compile every config the autotuner will time for these arguments, compile_threads() at a time, before it
        times them (it compiles each on first use, one after another: most of a first tuned call's time). Returns
        how many were compiled; nothing under the interpreter or with one thread. It only saves time: whatever
        fails here (a config that does not compile, bad arguments) is left to the autotuner, which meets it again
        and handles it as it would without this step (a config that fails to compile times as infinitely slow)."""
        from triton.runtime import _async_compile

        tuner = self.autotuner
        threads = compile_threads()
        if INTERPRET or threads <= 1 or len(tuner.configs) <= 1 or _async_compile.active_mode.get() is not None:
            return 0  # (an active mode: the caller's own parallel compile; one may be active at a time)
        from concurrent.futures import ThreadPoolExecutor

        try:
            configs = self._pruned(args, meta)
            if len(configs) <= 1:
                return 0
            with ThreadPoolExecutor(max_workers=min(threads, len(configs))) as pool, \
                    _async_compile.AsyncCompileMode(pool, ignore_errors=True):
                for cfg in configs:  # warmup: compile (here: submit the compile), no launch
                    self.kernel.warmup(*args, grid=(1,), **meta, **cfg.all_kwargs())
        except Exception:  # noqa: BLE001 - see above: the autotuner reports it
            return 0
        return len(configs)

    def launch(self, key, args, resolve):
        """Launch the plan of ``key`` with ``args``; on the key's first call ``resolve()`` gives (config bucket,
        grid(config kwargs) -> tuple, constexprs, the fixed config or None to tune) and the plan is made (a tuned
        first call is launched by the autotuner). Returns the plan."""
        plan = self.plans.get(key)
        if plan is None:
            bucket, grid, meta, fixed = resolve()
            cfg, launched = self.choose(bucket, grid, args, meta, fixed)
            plan = self.plan(key, cfg, grid(cfg.kwargs), meta)
            if launched:
                return plan
        plan.launch(*args)
        return plan

    def plan(self, key, cfg, grid, meta):
        """The plan of ``key``: ``cfg`` with the constexprs ``meta`` on the grid tuple ``grid``; cached unless ``cfg``
        is provisional."""
        plan = Plan(self.kernel, grid, {**meta, **cfg.all_kwargs()}, cfg)
        return plan if getattr(cfg, "provisional", False) else self.plans.put(key, plan)

    def clear(self):
        self.chosen.clear()
        self.plans.clear()


def clear_launch_caches():
    """Forget every chosen config and plan (tests that change a tuning threshold or a config space)."""
    for launcher in LAUNCHERS:
        launcher.clear()
    _LAUNCH_PLANS.clear()


# -- split-K choice ------------------------------------------------------------------------------------------------

def pick_splits(configs, tiles, k_steps, sms, key, unsplit_when_full=False):
    """Per tile shape (``key(config)``), the SPLIT_K values worth timing: the smallest giving >= 2 programs per SM
    and twice that, with >= 2 K steps per split; with ``unsplit_when_full``, SPLIT_K 1 alone where the output tiles
    alone give >= 2 programs per SM (a split then only adds partials traffic)."""
    chosen = {}
    for c in configs:
        chosen.setdefault(key(c), []).append(c)
    out = []
    for group in chosen.values():
        t, steps = tiles(group[0]), k_steps(group[0])
        ok = [c for c in group if c.kwargs["SPLIT_K"] == 1 or steps >= 2 * c.kwargs["SPLIT_K"]]
        if not ok:
            continue
        enough = [c for c in ok if t * c.kwargs["SPLIT_K"] >= 2 * sms] or [ok[-1]]
        first = enough[0].kwargs["SPLIT_K"]
        out += [c for c in ok if c.kwargs["SPLIT_K"] in ((1,) if first == 1 and unsplit_when_full else
                                                         (first, 2 * first))]
    return out


# -- split-K in one launch (the int8 / INT4 / bitmask matmuls, the MemoryFormer forward) -------------------------
# Split-K partials are reduced in the split launch itself, deterministically: every program stores its fp32 partials
# [s, M, N], then increments its output tile's int32 arrival counter (an acq_rel atomic, after a barrier: all its
# threads' stores are published first). The program that arrives last (the counter read SPLIT_K - 1)
# sums the SPLIT_K partials of the tile in split order 0, 1, ... (bypassing L1: ``.cg``), so the result does not
# depend on which split came last, writes y in its dtype and sets the counter back to 0 for the next launch. Counters
# are zero between launches, so a CUDA graph replays the launch as is (no zeroing node, no second kernel).
#
# The partials and counters (SplitScratch) are cached per (device, stream), not allocated per call: launches on one
# stream run one after another, so they can share one buffer; launches on two streams must not (they would mix
# counts), hence the stream in the key. Buffers grow (to the next power of two) outside graph capture only, and the
# replaced ones stay alive, since a graph captured earlier still points at them. Each growth also grows a pair kept for
# captures: a launch captured on a stream that has no buffers of its own (torch.cuda.graph captures on a stream of its
# own) takes that pair, zeroed when it was made, so the graph holds no zeroing node; only a launch whose first call is
# inside a capture gets graph-private buffers (its counters zeroed by a captured memset at each replay). Like cuBLAS's
# per-stream workspace, graphs sharing buffers must not be replayed concurrently: graphs captured on streams without
# eager buffers share the capture pair, and a graph captured on a stream that ran eager calls before (warm-up and
# capture on one stream) shares that stream's pair with its later eager calls, so replay it on that stream or after
# them. Memory ordering: each thread's partial stores, then the CTA barrier, then one thread's gpu-scope acq_rel add
# (cumulative through the barrier, as CUTLASS's semaphore and generic barrier release: __syncthreads + one thread's
# release); the last program's acquire, the broadcast of its result through shared memory + barrier, then the loads
# of the partials, bypassing L1 (.cg).

def _stream_key(device):
    if device.type != "cuda":
        return 0
    return torch._C._cuda_getCurrentRawStream(device.index if device.index is not None else
                                             torch.cuda.current_device())


class SplitScratch:
    """fp32 partials and int32 arrival counters of one-launch split-K matmuls, per (device, stream)."""

    def __init__(self):
        self.buffers = {}  # (device, stream or "capture") -> (partials fp32, counters int32)
        self.retired = []  # replaced buffers: graphs captured before may still use them
        self.unsplit = {}  # device -> a one-element int32 tensor, the counters argument of unsplit launches

    def get(self, like, split, numel, tiles):
        """(partials, counters) for a launch of ``split`` splits of ``numel`` outputs over ``tiles`` output tiles;
        ``like`` (the output) when unsplit: the kernel stores y directly and never reads the counters."""
        device = like.device
        if split == 1:
            dummy = self.unsplit.get(device)
            if dummy is None:
                dummy = self.unsplit[device] = torch.empty(1, dtype=torch.int32, device=device)
            return like, dummy
        key = (device, _stream_key(device))
        bufs = self.buffers.get(key)
        if bufs is None or bufs[0].numel() < split * numel or bufs[1].numel() < tiles:
            bufs = self._slow_path(key, split * numel, tiles)
        return bufs

    def _slow_path(self, key, parts, tiles):
        device = key[0]
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            bufs = self.buffers.get((device, "capture"))
            if bufs is not None and bufs[0].numel() >= parts and bufs[1].numel() >= tiles:
                return bufs
            # a zeros() here is a captured memset, not run now: private buffers for this captured launch only
            return (torch.empty(parts, dtype=torch.float32, device=device),
                    torch.zeros(tiles, dtype=torch.int32, device=device))
        self._grow((device, "capture"), parts, tiles)
        return self._grow(key, parts, tiles)

    def _grow(self, key, parts, tiles):
        old = self.buffers.get(key)
        if old is not None:
            if old[0].numel() >= parts and old[1].numel() >= tiles:
                return old
            self.retired.append(old)
            parts, tiles = max(parts, old[0].numel()), max(tiles, old[1].numel())
        bufs = self.buffers[key] = (torch.empty(next_pow2(parts), dtype=torch.float32, device=key[0]),
                                    torch.zeros(next_pow2(tiles), dtype=torch.int32, device=key[0]))
        return bufs


SCRATCH = SplitScratch()


@triton.jit
def splitk_finish(y_ptr, p_ptr, c_ptr, rm, rn, M, N, SPLIT_K, tile):
    """The one-launch reduction (see above), called by every program after it stored its partials of rows ``rm`` and
    columns ``rn`` (nothing when SPLIT_K == 1: y is stored already). ``tile``: the output tile's counter index."""
    if SPLIT_K > 1:
        tl.debug_barrier()  # every thread of the program has stored its partials
        arrived = tl.atomic_add(c_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:
            mask = (rm[:, None] < M) & (rn[None, :] < N)
            offs = rm.to(tl.int64)[:, None] * N + rn[None, :]
            step = tl.cast(M, tl.int64) * N
            acc = tl.load(p_ptr + offs, mask=mask, other=0.0, cache_modifier=".cg")
            for s in range(1, SPLIT_K):
                acc += tl.load(p_ptr + s * step + offs, mask=mask, other=0.0, cache_modifier=".cg")
            tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)
            tl.atomic_xchg(c_ptr + tile, 0, sem="relaxed", scope="gpu")  # every split has arrived: ready for reuse


# -- Philox stream of weightkit.ops.rng ----------------------------------------------------------------------------

@triton.jit
def philox_uniform(position, seed):
    """fp32 uniform in [0, 1) for int64 stream ``position`` -- the same function as weightkit.ops.rng.uniform."""
    counter = position >> 2
    c0 = (counter & 0xFFFFFFFF).to(tl.uint32)
    c1 = ((counter >> 32) & 0xFFFFFFFF).to(tl.uint32)
    zero = tl.zeros_like(c0)
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, zero, zero, 10)
    lane = position & 3
    bits = tl.where(lane == 0, r0, tl.where(lane == 1, r1, tl.where(lane == 2, r2, r3)))
    return (bits >> 8).to(tl.float32) * (1.0 / 16777216.0)


@triton.jit
def _u24(bits):
    return (bits >> 8).to(tl.float32) * (1.0 / 16777216.0)


@triton.jit
def philox_uniform4(counter, seed, N: tl.constexpr):
    """The uniforms of stream positions 4 * counter + 0..3, interleaved: N = 4 * len(counter) values, in order.
    One Philox evaluation gives four lanes (the stream's definition, weightkit.ops.rng), so this costs a quarter of
    calling philox_uniform per element."""
    c0 = (counter & 0xFFFFFFFF).to(tl.uint32)
    c1 = ((counter >> 32) & 0xFFFFFFFF).to(tl.uint32)
    zero = tl.zeros_like(c0)
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, zero, zero, 10)
    # join adds a last axis: join(join(a, c), join(b, d))[i, k, j] is (a, b, c, d)[2k + j]: lanes 0..3 in order
    return tl.reshape(tl.join(tl.join(_u24(r0), _u24(r2)), tl.join(_u24(r1), _u24(r3))), (N,))


# -- tile helpers of the GEMV / GEMM kernels -----------------------------------------------------------------------

@triton.jit
def unpack_int4_f32(b, ROWS: tl.constexpr, COLS: tl.constexpr):
    """[ROWS, COLS // 2] packed bytes -> [ROWS, COLS] fp32 values 2^23 + q (element 2j: low nibble of byte j)."""
    lo = (b & 0xF).to(tl.int32)
    hi = (b >> 4).to(tl.int32)
    q = tl.reshape(tl.join(lo, hi), (ROWS, COLS))
    return (q | 0x4B000000).to(tl.float32, bitcast=True)


@triton.jit
def group_broadcast(v, ROWS: tl.constexpr, GROUPS: tl.constexpr, COLS: tl.constexpr):
    """[ROWS, GROUPS] per-group values -> [ROWS, COLS]: each repeated over its COLS // GROUPS consecutive columns."""
    return tl.reshape(tl.broadcast_to(v[:, :, None], (ROWS, GROUPS, COLS // GROUPS)), (ROWS, COLS))


@triton.jit
def int4_tile_parts(packed_ptr, scale_ptr, zero_ptr, rows, rmask, c0, row_len, row_bytes, PG: tl.constexpr,
                    ROWS: tl.constexpr, COLS: tl.constexpr):
    """(q - z as exact float32 integers in [-15, 15], [ROWS, COLS]; the scales, [ROWS, max(COLS / PG, 1)]) of the
    tile that :func:`dequant_int4_tile` dequantizes (same arguments and conditions): each row's values are COLS / 2
    contiguous bytes (one vector load), and its groups max(COLS / PG, 1) consecutive (scale, zero) pairs, loaded once.
    0 outside (rmask, columns >= row_len)."""
    half = tl.arange(0, COLS // 2)
    byte = (c0 // COLS) * (COLS // 2) + half  # the byte in the row (masked in bytes, so runs of 16 stay whole)
    b = tl.load(packed_ptr + (rows * row_bytes)[:, None] + byte[None, :],
                mask=rmask[:, None] & (byte < row_bytes)[None, :], other=0)
    GROUPS: tl.constexpr = COLS // PG if COLS >= PG else 1
    gi = tl.arange(0, GROUPS)
    gmask = rmask[:, None] & (c0 + gi * PG < row_len)[None, :]
    g = ((rows * row_len + c0) // PG)[:, None] + gi[None, :]
    s = tl.load(scale_ptr + g, mask=gmask, other=0.0)
    c = tl.load(zero_ptr + g, mask=gmask, other=0).to(tl.float32) + 8388608.0
    q = unpack_int4_f32(b, ROWS, COLS)  # 2^23 + q: minus 2^23 + z gives q - z exactly
    return q - group_broadcast(c, ROWS, GROUPS, COLS), s


@triton.jit
def dequant_int4_tile(packed_ptr, scale_ptr, zero_ptr, rows, rmask, c0, row_len, row_bytes, PG: tl.constexpr,
                      ROWS: tl.constexpr, COLS: tl.constexpr):
    """float32 values (q - z) * s of a packed INT4 matrix (weightkit.ops.int4's format, row_len values per row) at
    ``rows`` (int64, [ROWS]) x columns c0 .. c0 + COLS - 1, 0 outside (rmask, columns >= row_len). Needs row_len even
    and a multiple of the power-of-two group PG, and c0 a multiple of min(COLS, PG): each row's values are
    COLS / 2 contiguous bytes (one vector load), and its groups max(COLS / PG, 1) consecutive (scale, zero) pairs,
    loaded once and broadcast, not gathered element by element (dequant_int4: three 64-bit addresses per value).
    ``row_bytes`` = row_len / 2, an argument of the kernel: Triton then knows it a multiple of 16 where it is, and
    loads each row's bytes as 16-byte vectors (computed from row_len, its divisibility is lost)."""
    qz, s = int4_tile_parts(packed_ptr, scale_ptr, zero_ptr, rows, rmask, c0, row_len, row_bytes, PG, ROWS, COLS)
    GROUPS: tl.constexpr = COLS // PG if COLS >= PG else 1
    return qz * group_broadcast(s, ROWS, GROUPS, COLS)


@triton.jit
def dequant_int4(packed_ptr, scale_ptr, zero_ptr, lin, group_size, mask):
    """float32 values of a packed INT4 matrix (weightkit.ops.int4's format: two values per byte, the low nibble the
    even index; a float32 scale and a uint8 zero per group) at flat indices ``lin`` (int64)."""
    byte = tl.load(packed_ptr + (lin >> 1), mask=mask, other=0).to(tl.int32)
    q = ((byte >> ((lin & 1) * 4).to(tl.int32)) & 0xF).to(tl.float32)
    grp = lin // group_size
    s = tl.load(scale_ptr + grp, mask=mask, other=0.0)
    z = tl.load(zero_ptr + grp, mask=mask, other=0).to(tl.float32)
    return (q - z) * s


@triton.jit
def tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program_id(0) in grouped order: GROUP_M row tiles sweep the N tiles together, so a
    weight tile is read by GROUP_M programs close in time (from L2) instead of once per row of tiles."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    return pid_m, pid_n


@triton.jit
def k_mask(rk, K, EVEN_K: tl.constexpr, BLOCK_K: tl.constexpr):
    """The k < K mask of a K-step (all true, no compare, when BLOCK_K divides every split: EVEN_K)."""
    if EVEN_K:
        mask = tl.full((BLOCK_K,), True, tl.int1)
    else:
        mask = rk < K
    return mask


@triton.jit
def k_range(K, SPLIT_K, BLOCK_K: tl.constexpr):
    """[k_lo, k_hi) of this program's split; split boundaries are multiples of BLOCK_K, so masking k < K suffices
    inside a split (and stays vectorizable when K is a multiple of 16)."""
    span = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_lo = tl.program_id(1) * span
    return k_lo, tl.minimum(K, k_lo + span)


@triton.jit
def gemv_tile(N, K, SPLIT_K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The prologue of a decode GEMV program (grid (N tiles, SPLIT_K)): (pid_n, k_lo, k_hi, rn, rn64, mask_n, rk)."""
    pid_n = tl.program_id(0)
    k_lo, k_hi = k_range(K, SPLIT_K, BLOCK_K)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return pid_n, k_lo, k_hi, rn, rn.to(tl.int64), rn < N, k_lo + tl.arange(0, BLOCK_K)


@triton.jit
def x_offsets(rk, stride_xk, BLOCK_K: tl.constexpr):
    """(offsets of x's k-tile along a row, their step per K-step), int64: a strided x may span > 2^31 elements."""
    return rk.to(tl.int64) * stride_xk, tl.cast(stride_xk, tl.int64) * BLOCK_K


@triton.jit
def gemv_accumulators(TRANS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The four per-token fp32 accumulators of a decode GEMV: [BLOCK_K, BLOCK_N] with TRANS, else [BLOCK_N, BLOCK_K]
    (tensors are values: the four start equal and diverge)."""
    if TRANS:
        acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    return acc, acc, acc, acc


@triton.jit
def mm_tile(x_ptr, M, N, K, stride_xm, stride_xk, SPLIT_K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """The prologue of a tensor-core program: (pid_n, k_lo, k_hi, rm, rn, rn64, mask_m, mask_n, rk, x_ptrs), the
    activation pointers of its first K step in int64 (a strided x may span more than 2^31 elements)."""
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    k_lo, k_hi = k_range(K, SPLIT_K, BLOCK_K)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = k_lo + tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rm.to(tl.int64)[:, None] * stride_xm + rk.to(tl.int64)[None, :] * stride_xk
    return pid_n, k_lo, k_hi, rm, rn, rn.to(tl.int64), rm < M, rn < N, rk, x_ptrs


@triton.jit
def weight_dot(acc, w, xt, s, dt: tl.constexpr, PRECISION: tl.constexpr, SCALE_AFTER_DOT: tl.constexpr):
    """acc [BLOCK_N, BLOCK_M] += w [BLOCK_N, BLOCK_K] . xt [BLOCK_M, BLOCK_K]^T in fp32 on the tensor cores, both
    operands in ``dt``: SCALE_AFTER_DOT, w exact in dt (q, or q - z) and its rows' scales ``s`` [BLOCK_N, 1] applied
    to the step's dot; else w already scaled (fp32), rounded once to dt (the quantized matmuls' precision contract)
    and accumulated in the dot."""
    if SCALE_AFTER_DOT:
        return acc + tl.dot(w.to(dt), tl.trans(xt.to(dt)), input_precision=PRECISION, out_dtype=tl.float32) * s
    else:
        return tl.dot(w.to(dt), tl.trans(xt.to(dt)), acc=acc, input_precision=PRECISION, out_dtype=tl.float32)


# Compiled code converts float32 to bf16 to nearest, ties to even (Triton's default rounding of a downcast:
# cvt.rn.bf16.f32); the interpreter's cast truncates (Triton 3.9).
_CVT_BF16_RN = tl.constexpr(not INTERPRET)


@triton.jit
def round_bf16(x):
    """float32 ``x`` rounded to the nearest bfloat16 (ties to even), as float32: torch's ``x.to(torch.bfloat16)``,
    NaN staying NaN. Compiled: the conversion instruction and back; under the interpreter, whose cast truncates, by
    bits (where a NaN with a low payload, e.g. CUDA's canonical 0x7FFFFFFF, would carry into the exponent or the
    sign: it is kept as it is)."""
    if _CVT_BF16_RN:
        return x.to(tl.bfloat16).to(tl.float32)
    else:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        return tl.where(x == x, bits.to(tl.float32, bitcast=True), x)


@triton.jit
def split3_bf16(x):
    """float32 ``x`` as three float32 values of bfloat16 precision, hi + mid + lo == x (each the nearest bf16 of what
    the previous ones left, the differences exact: 3 x 8 bits hold float32's 24-bit significand). A NaN makes NaN
    parts; an infinite x is its own hi (mid = lo = 0), so products with it are IEEE's (inf, or NaN times zero)."""
    hi = round_bf16(x)
    rest = tl.where(hi == x, 0.0, x - hi)  # an infinite x is its own hi (inf - inf would make its parts NaN)
    mid = round_bf16(rest)
    return hi, mid, round_bf16(rest - mid)


@triton.jit
def dot3(a, b, TC_BF16: tl.constexpr, SPLIT_A: tl.constexpr = False, FP16_B: tl.constexpr = False):
    """a . b for one operand of bf16-exact values (the INT4 integers q - z; a bf16 activation) and one float32 operand
    (``b``, or ``a`` with SPLIT_A) split in three bf16 parts (split3_bf16): three products, smallest first, each exact
    in float32 (two bf16 significands), float32 accumulation: float32 accuracy from bf16 tensor-core products
    (TC_BF16; the interpreter, whose bf16 dot is wrong in Triton 3.9, multiplies the same exact values in float32).
    2-D or batched 3-D operands. Splitting ``a`` keeps ``b`` as it is: on Hopper the split parts stay in registers
    (wgmma's register operand) and ``b`` is staged in shared memory once for the three products.
    FP16_B (with SPLIT_A): ``b`` holds float16 values (11-bit significands, not bf16-exact), split in two bf16 parts
    (hi + lo == b exactly: lo holds the <= 3 bits hi left, in bf16's wider exponent range) for five exact products;
    the sixth, a's smallest part times b's, is below 2^-26 of |a b| and is left out."""
    dt = tl.bfloat16 if TC_BF16 else tl.float32  # exact casts either way; "ieee" matters for float32 operands only
    if SPLIT_A:
        hi, mid, lo = split3_bf16(a)
        if FP16_B:
            bf = b.to(tl.float32)
            b_hi = round_bf16(bf)
            b_lo = (bf - b_hi).to(dt)
            b_hi = b_hi.to(dt)
            t = tl.dot(lo.to(dt), b_hi, input_precision="ieee", out_dtype=tl.float32)
            t = tl.dot(mid.to(dt), b_lo, acc=t, input_precision="ieee", out_dtype=tl.float32)
            t = tl.dot(hi.to(dt), b_lo, acc=t, input_precision="ieee", out_dtype=tl.float32)
            t = tl.dot(mid.to(dt), b_hi, acc=t, input_precision="ieee", out_dtype=tl.float32)
            return tl.dot(hi.to(dt), b_hi, acc=t, input_precision="ieee", out_dtype=tl.float32)
        else:
            b = b.to(dt)
            t = tl.dot(lo.to(dt), b, input_precision="ieee", out_dtype=tl.float32)
            t = tl.dot(mid.to(dt), b, acc=t, input_precision="ieee", out_dtype=tl.float32)
            return tl.dot(hi.to(dt), b, acc=t, input_precision="ieee", out_dtype=tl.float32)
    else:
        hi, mid, lo = split3_bf16(b)
        a = a.to(dt)
        t = tl.dot(a, lo.to(dt), input_precision="ieee", out_dtype=tl.float32)
        t = tl.dot(a, mid.to(dt), acc=t, input_precision="ieee", out_dtype=tl.float32)
        return tl.dot(a, hi.to(dt), acc=t, input_precision="ieee", out_dtype=tl.float32)


@triton.jit
def dot6(a, b, TC_BF16: tl.constexpr):
    """a . b for two float32 operands, each split in three bf16 parts (split3_bf16): the six products of parts whose
    significands reach 2^-16 of the leading one (hi.lo, mid.mid, lo.hi, hi.mid, mid.hi, then hi.hi), smallest first,
    each exact in float32 (two bf16 significands), summed in a fresh float32 accumulator. The three left out (mid.lo,
    lo.mid, lo.lo) are below 2^-24 of |a||b| term by term: float32 accuracy from bf16 tensor-core products (TC_BF16;
    the interpreter, whose bf16 dot is wrong in Triton 3.9, multiplies the same exact values in float32), where a
    strict-fp32 dot runs on the FMA units. The caller adds the result to its running sum (``acc += dot6(...)``: a
    round-to-nearest float32 add a K step, so the tensor cores' own accumulation, which truncates, spans one K step,
    not the whole K). Finite operands below 2^127 in magnitude (a split of a larger value can round to infinity)."""
    dt = tl.bfloat16 if TC_BF16 else tl.float32
    a_hi, a_mid, a_lo = split3_bf16(a)
    b_hi, b_mid, b_lo = split3_bf16(b)
    a_hi, a_mid, a_lo = a_hi.to(dt), a_mid.to(dt), a_lo.to(dt)
    b_hi, b_mid, b_lo = b_hi.to(dt), b_mid.to(dt), b_lo.to(dt)
    t = tl.dot(a_hi, b_lo, input_precision="ieee", out_dtype=tl.float32)
    t = tl.dot(a_mid, b_mid, acc=t, input_precision="ieee", out_dtype=tl.float32)
    t = tl.dot(a_lo, b_hi, acc=t, input_precision="ieee", out_dtype=tl.float32)
    t = tl.dot(a_hi, b_mid, acc=t, input_precision="ieee", out_dtype=tl.float32)
    t = tl.dot(a_mid, b_hi, acc=t, input_precision="ieee", out_dtype=tl.float32)
    return tl.dot(a_hi, b_hi, acc=t, input_precision="ieee", out_dtype=tl.float32)


@triton.jit
def split_x_dot(acc, w, xt, s, TC_BF16: tl.constexpr, SCALE_AFTER_DOT: tl.constexpr):
    """The quantized matmuls' float32 x without TF32 (SPLIT_X): acc [BLOCK_N, BLOCK_M] += w [BLOCK_N, BLOCK_K] .
    xt [BLOCK_M, BLOCK_K]^T, where ``w`` holds exact bf16 values (int8 q; INT4 q - z) and x's float32 tile (its
    per-k scales already folded in by the caller where groups run along N) is split in three bf16 parts: three exact
    products on bf16 tensor cores (dot3), summed in a fresh float32 accumulator, scaled per weight row ``s``
    [BLOCK_N, 1] (SCALE_AFTER_DOT) and added: float32 accuracy where a strict-fp32 dot runs on the FMA units."""
    t = dot3(w, tl.trans(xt), TC_BF16)
    if SCALE_AFTER_DOT:
        return acc + t * s
    return acc + t


@triton.jit
def store_result(y_ptr, p_ptr, c_ptr, acc, rm, rn, M, N, SPLIT_K):
    """The tensor-core kernels' end: acc [BLOCK_N, BLOCK_M] fp32 (transposed: weight rows first) into y (cast) when
    unsplit, else into this split's fp32 partials, then the one-launch reduction of the output tile program_id(0)
    (splitk_finish)."""
    out = tl.trans(acc)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    offs = rm.to(tl.int64)[:, None] * N + rn[None, :]
    if SPLIT_K == 1:
        tl.store(y_ptr + offs, out.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(p_ptr + tl.program_id(1).to(tl.int64) * M * N + offs, out, mask=mask)
    splitk_finish(y_ptr, p_ptr, c_ptr, rm, rn, M, N, SPLIT_K, tl.program_id(0))


@triton.jit
def _gemv_row(acc, x_ptr, i: tl.constexpr, stride_xm, M, x_offs, x_mask, w, s_k, TRANS: tl.constexpr):
    """acc += x[i, k-tile] * w (w: [BLOCK_K, BLOCK_N] with TRANS, else [BLOCK_N, BLOCK_K]); s_k: per-k scales
    folded into x (TRANS), or 1. x_offs: int64 offsets of the k-tile along a row."""
    xv = tl.load(x_ptr + tl.cast(stride_xm, tl.int64) * i + x_offs, mask=x_mask & (x_offs * 0 + i < M),
                 other=0.0).to(tl.float32)
    if TRANS:
        return acc + (xv * s_k)[:, None] * w
    else:
        return acc + xv[None, :] * w


@triton.jit
def _gemv_store(y_ptr, p_ptr, acc, i: tl.constexpr, rn, M, N, SPLIT_K, TRANS: tl.constexpr):
    """Reduce row i's accumulator over k and store it (into y, or into this split's fp32 partials)."""
    out = tl.sum(acc, axis=0 if TRANS else 1)
    mask = (rn < N) & (rn * 0 + i < M)  # (tensor-shaped: the 3.9 interpreter turns tensor & scalar-bool into int)
    if SPLIT_K == 1:
        tl.store(y_ptr + tl.cast(N, tl.int64) * i + rn, out.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(p_ptr + (tl.program_id(1).to(tl.int64) * M + i) * N + rn, out, mask=mask)


@triton.jit
def gemv_rows(acc0, acc1, acc2, acc3, x_ptr, stride_xm, M, x_offs, x_mask, w, s_k, TRANS: tl.constexpr,
              BLOCK_M: tl.constexpr):
    """_gemv_row for the BLOCK_M (1, 2 or 4) token rows of a decode GEMV, one accumulator each."""
    acc0 = _gemv_row(acc0, x_ptr, 0, stride_xm, M, x_offs, x_mask, w, s_k, TRANS)
    if BLOCK_M > 1:
        acc1 = _gemv_row(acc1, x_ptr, 1, stride_xm, M, x_offs, x_mask, w, s_k, TRANS)
    if BLOCK_M > 2:
        acc2 = _gemv_row(acc2, x_ptr, 2, stride_xm, M, x_offs, x_mask, w, s_k, TRANS)
        acc3 = _gemv_row(acc3, x_ptr, 3, stride_xm, M, x_offs, x_mask, w, s_k, TRANS)
    return acc0, acc1, acc2, acc3


@triton.jit
def gemv_store_rows(y_ptr, p_ptr, c_ptr, acc0, acc1, acc2, acc3, rn, M, N, SPLIT_K, TRANS: tl.constexpr,
                    BLOCK_M: tl.constexpr):
    """A decode GEMV's end: _gemv_store for its BLOCK_M token rows, then the one-launch reduction of the output tile
    program_id(0) (splitk_finish)."""
    _gemv_store(y_ptr, p_ptr, acc0, 0, rn, M, N, SPLIT_K, TRANS)
    if BLOCK_M > 1:
        _gemv_store(y_ptr, p_ptr, acc1, 1, rn, M, N, SPLIT_K, TRANS)
    if BLOCK_M > 2:
        _gemv_store(y_ptr, p_ptr, acc2, 2, rn, M, N, SPLIT_K, TRANS)
        _gemv_store(y_ptr, p_ptr, acc3, 3, rn, M, N, SPLIT_K, TRANS)
    splitk_finish(y_ptr, p_ptr, c_ptr, tl.arange(0, BLOCK_M), rn, M, N, SPLIT_K, tl.program_id(0))


def dot_precision(x):
    return "ieee" if x.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32 else "tf32"


def dot_meta(device, dtype, precision):
    """PRECISION, and fp32 dot operands for bf16 under the interpreter (which multiplies bf16, stored as uint16, as
    integers: DOT_F32)."""
    if device.type == "cpu" and dtype == torch.bfloat16:
        return dict(PRECISION="ieee", DOT_F32=True)
    return dict(PRECISION=precision)


# -- split-K GEMV / GEMM dispatch ----------------------------------------------------------------------------------

GEMV_MAX_M = 4  # at most this many tokens take the GEMV (FMA work grows with M; tensor cores take over)
SPLIT_MAX_M = 64  # split-K only up to this many tokens (partials traffic grows with M)
SPLITS = (1, 2, 4, 8, 16)


class SplitKMatmul:
    """The launch of a GEMV kernel (M <= GEMV_MAX_M tokens, no tensor cores) or a tensor-core kernel (more tokens)
    writing ``out`` (M x n_out), directly or, with SPLIT_K > 1, through fp32 partials [SPLIT_K, M, n_out] reduced in
    the same launch: the kernels take ``(*lead, out, partials, counters, *tail)`` (splitk_finish; partials and
    counters from SCRATCH, the counter of an output tile indexed by its program_id(0)). SPLIT_K and the BLOCK_* sizes
    come from the config; ``out_block`` names the block size along n_out.

    ``__call__(key, ...)``: ``key`` holds everything the launch depends on (exact M included); on its first call,
    ``setup(gemv)`` gives (constexprs, the fixed config or None to tune, the config bucket: key with M bucketed)."""

    def __init__(self, gemv: Launcher, mm: Launcher, out_block: str):
        self.gemv, self.mm, self.out_block = gemv, mm, out_block

    def grid(self, gemv, M, n_out, c):
        tiles = cdiv(n_out, c[self.out_block])
        return (tiles, c["SPLIT_K"]) if gemv else (cdiv(M, c["BLOCK_M"]) * tiles, c["SPLIT_K"])

    def __call__(self, key, lead, out, tail, M, n_out, setup):
        launcher = self.gemv if M <= GEMV_MAX_M else self.mm
        plan = launcher.plans.get(key)
        if plan is None:
            plan = self._first_call(launcher, key, lead, out, tail, M, n_out, setup)
            if plan is None:  # tuned: the autotuner launched the chosen config (its splits reduced in the launch)
                return out
        plan.launch(*lead, out, *SCRATCH.get(out, plan.kwargs["SPLIT_K"], M * n_out, plan.grid[0]), *tail)
        return out

    def _first_call(self, launcher, key, lead, out, tail, M, n_out, setup):
        gemv = launcher is self.gemv
        meta, fixed, bucket = setup(gemv)
        if fixed is None and bucket not in launcher.chosen:
            # the tuning launch: partials for the largest split among the candidates (counters for the most tiles)
            may_split = M <= SPLIT_MAX_M or len(launcher.configs) == 1
            max_split = max(c.kwargs["SPLIT_K"] for c in launcher.configs) if may_split else 1
            tiles = max(self.grid(gemv, M, n_out, c.kwargs)[0] for c in launcher.configs)
            scratch = SCRATCH.get(out, max_split, M * n_out, tiles)
        else:
            scratch = (out, out)  # not launched here (the plan launches), any tensors do
        cfg, launched = launcher.choose(bucket, lambda c: self.grid(gemv, M, n_out, c), (*lead, out, *scratch, *tail),
                                        meta, fixed)
        plan = launcher.plan(key, cfg, self.grid(gemv, M, n_out, cfg.kwargs), meta)
        return None if launched else plan


# -- dequantize-and-multiply (int8_matmul, int4_matmul) ------------------------------------------------------------
# y = x @ B, fp32 accumulation, y in x's dtype, with
#   transpose=False: B[k, n] = W[n, k]  (K = in features; a K-step reads BLOCK_K contiguous values of W's rows)
#   transpose=True:  B[k, n] = W[k, n]  (K = out rows; a K-step reads BLOCK_N contiguous values of W's rows)
# and W = dequant(weight): G consecutive elements of a row share one scale (G divides the row length when ALIGNED).
#
# Two kernels per weight format (int8.py, int4.py), picked by the number of tokens M:
# * M <= GEMV_MAX_M (decode), the GEMV: no tensor cores. Grid (N / BLOCK_N, SPLIT_K): each program reads a
#   BLOCK_N x (K / SPLIT_K) slab of the weight exactly once with 16-byte loads along W's contiguous axis, dequantizes
#   in registers and accumulates x * w into an fp32 register tile per token, reduced once after the loop.
# * M > GEMV_MAX_M, the tensor-core kernel. The dequantized weight tile is the LEFT operand:
#   acc[n, m] = sum_k W'[n, k] x[m, k], so on Hopper it feeds wgmma from registers (x comes from shared memory) and
#   16 decode tokens still fill a 64-row MMA with weight rows. Grid (M tiles x N tiles in grouped order, SPLIT_K);
#   SPLIT_K > 1 only up to SPLIT_MAX_M tokens.
# Both reduce split-K partials in the same launch (splitk_finish: one kernel per call, deterministic, graph-replayable)
# and split only where the output tiles alone give < 2 programs per SM (pick_splits, unsplit_when_full).
# Scales: with BLOCK_K dividing G (transpose=False) a K-step lies in one group, so each weight row has one scale per
# step: acc += dot(q, x^T) * s[n] (exact products) or the tile is scaled before the dot, whichever the autotuner
# finds faster (SCALE_AFTER_DOT). With transpose=True the groups run along N: BLOCK_N divides G, so an N tile sees one
# scale per k, which scales the tile before the dot (or x, in fp32, in the GEMV). Any other G (or an unaligned INT4
# layout) takes ALIGNED=False: one scale gathered per element, slower, always correct.
# A float32 result of a 16-bit x (INT4's out_dtype=float32: GaLore's projections of a bf16 / fp16 gradient) sets
# SPLIT3: a tile scaled before the dot is split in three bf16 parts for three exact products (dot3; an fp16 x tile
# also split, in two bf16 parts: five products), W never rounded to x's dtype.
# A float32 x without TF32 ("ieee", torch's default) takes either FMA dots (BLOCK_K <= 32 tiles) or SPLIT_X: x's
# tile split in three bf16 parts in registers, three exact products with the weight's integers on bf16 tensor cores
# (split_x_dot; the per-k scales of a transposed weight folded into x first), float32 accuracy; the tuner times both
# kinds, the shape rules take SPLIT_X (FLOAT32_X_SPLIT: False keeps the FMA dots, for a measurement's baseline).
# Autotuning only for weights of >= the op's TUNE_MIN_WEIGHT elements with G % TUNE_GROUP == 0 (one fixed config
# otherwise); config bucket: M rounded up to a power of 2, N, K, G, precision, dtype, device.

TUNE_GROUP = 64  # the tuned configs need G % 64 == 0 (BLOCK_K, resp. BLOCK_N, of every config divides 64 or G)
# A float32 x without TF32 may be split in three bf16 parts (SPLIT_X, see above): read at each new launch plan and
# part of its key, so a benchmark can set it False to time the FMA dots at the same shapes.
FLOAT32_X_SPLIT = True


@contextlib.contextmanager
def float32_x_split(enabled):
    """FLOAT32_X_SPLIT set to ``enabled`` inside the block, put back after (benchmarks timing both kinds)."""
    global FLOAT32_X_SPLIT
    before, FLOAT32_X_SPLIT = FLOAT32_X_SPLIT, enabled
    try:
        yield
    finally:
        FLOAT32_X_SPLIT = before


GEMV_KEY = ["M", "N", "K", "G"]
MM_KEY = ["M", "N", "K", "G", "PRECISION"]


def gemv_configs(trans, wbits):
    """GEMV tiles: >= 16 contiguous bytes of weight per thread and step along W's contiguous axis (tiles with fewer
    are dropped: at 4 bits a 32 x 64 tile is 8 bytes per thread of 4 warps), a few KB of weight per step,
    <= 64 fp32 accumulators per thread (checked in the pruner, which also picks SPLIT_K and drops tiles that
    do not fit the group). num_stages 1: Triton does not software-pipeline loads that feed no tl.dot (sm_90 compiles
    of these loops have no cp.async at 2 or 3 stages), so the bytes in flight per SM come from the programs resident
    there: split K where the output tiles alone leave SMs with few programs."""
    if trans:  # (BLOCK_K, BLOCK_N, warps): BLOCK_N contiguous, divides G
        tiles = [(32, 128, 4), (64, 128, 4), (32, 64, 4), (64, 64, 4), (128, 64, 4), (128, 128, 8)]
        if wbits == 4:
            tiles += [(128, 128, 4)]
        tiles = [(bk, bn, w) for bk, bn, w in tiles if bk * bn * wbits // 8 >= 16 * 32 * w]
        tiles += [(64, 32, 4)] if wbits == 4 else []  # 3-4 tokens (few_token_tile)
        return [config(w, 1, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=s) for bk, bn, w in tiles for s in SPLITS]
    tiles = [(32, 128, 4), (64, 128, 4), (16, 128, 4), (16, 256, 4), (32, 64, 4), (64, 64, 4), (128, 64, 8)]  # BN BK w
    if wbits == 4:
        tiles += [(128, 64, 4), (256, 64, 8)]
    tiles = [(bn, bk, w) for bn, bk, w in tiles if bn * bk * wbits // 8 >= 16 * 32 * w]
    tiles += [(32, 64, 4)] if wbits == 4 else []  # 3-4 tokens (few_token_tile)
    return [config(w, 1, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=s) for bn, bk, w in tiles for s in SPLITS]


FEW_TOKEN_TILE = 2048  # values of the GEMV tiles whose product tile fits 3-4 tokens on 4 warps (<= 64 a thread)


def few_token_tile(c):
    """A GEMV tile of at most FEW_TOKEN_TILE values: INT4's (8 bytes of weight a thread and step; its 16-byte tiles
    hold >= 4096 values, 4 x 4096 > 64 a thread) and the bitmask kernels' small tiles."""
    return c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"] <= FEW_TOKEN_TILE


def unless_few_tokens(fit):
    """The configs of ``fit`` without the few-token tiles where a larger tile fits (1-2 tokens): those are timed only
    for the 3-4 tokens nothing larger fits."""
    larger = [c for c in fit if not few_token_tile(c)]
    return larger or fit


def gemv_interpreter_config(trans):
    return config(4, 1, BLOCK_N=64, BLOCK_K=32, SPLIT_K=2) if trans else config(4, 1, BLOCK_N=32, BLOCK_K=64, SPLIT_K=2)


def mm_configs(trans):
    """Tensor-core tiles (BLOCK_N = weight rows = the MMA's M side, BLOCK_M = tokens). Decode: BLOCK_M 16/32/64 with
    split-K. Prefill: 64-256 x 64-256 x 64-128 tiles, 4-8 warps, 3-4 stages (Triton's matmul tutorial, gemlite),
    sized so that the fp32 accumulator plus the per-step dot result (SCALE_AFTER_DOT) stays in registers (sm_90
    compiles of these tiles: <= 245 registers, no spills). Pruned by M, by the group (BLOCK_K resp. BLOCK_N divides
    G) and by shared memory. transpose=False scales after each dot (exact); transpose=True scales the weight tile
    first, rounded once to x's dtype (one dot, as the ops' precision contract allows). The FMA tiles (BLOCK_K <= 32)
    serve a float32 x without TF32, as do the tensor-core tiles again with SPLIT_X (x split in three bf16 parts)."""
    post = 0 if trans else 1
    out = []
    # decode, (BLOCK_N, BLOCK_K, warps, stages, BLOCK_Ms): tiles whose sm_90 compile spills are left out
    decode = [(64, 64, 4, 4, (16, 32, 64)), (128, 64, 4, 4, (16, 32, 64)), (64, 128, 4, 3, (16, 32, 64)),
              (128, 128, 4, 3, (16, 32))]
    # fp32 x without TF32 ("ieee"): tl.dot runs on FMA units; BLOCK_K <= 32 keeps its operands in registers
    fma_decode = [(64, 32, 4, 3, (16, 32))]
    for bn, bk, w, st, bms in decode + fma_decode:
        for bm in bms:
            for s in SPLITS[:4]:
                out.append(config(w, st, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=s, SCALE_AFTER_DOT=post))
    prefill = [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4)]
    prefill += [(256, 64, 64, 8, 3), (64, 256, 64, 8, 3), (128, 128, 128, 8, 3)]
    prefill += [(64, 64, 16, 4, 3), (64, 128, 16, 8, 3), (128, 64, 16, 8, 3)]  # FMA (ieee) tiles
    for bm, bn, bk, w, st in prefill:  # (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages)
        out.append(config(w, st, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=1, SCALE_AFTER_DOT=post))
    # SPLIT_X (a float32 x without TF32, x split in three bf16 parts): the tensor-core tiles again (pruned by
    # _split_x_spills)
    out += [config(c.num_warps, c.num_stages, **c.kwargs, SPLIT_X=1) for c in list(out) if c.kwargs["BLOCK_K"] > 32]
    return out


def mm_interpreter_config(trans):
    return config(4, 2, BLOCK_M=16, BLOCK_N=64, BLOCK_K=32 if trans else 64, SPLIT_K=2,
                  SCALE_AFTER_DOT=0 if trans else 1)


def make_gemv_pruner(trans, wbits):
    def prune(configs, named_args, **kwargs):
        n, k, g = named_args["N"], named_args["K"], named_args["G"]
        bm = kwargs["BLOCK_M"]
        sms, _ = device_info(named_args["x_ptr"].device)
        grouped = [c for c in configs if g % (c.kwargs["BLOCK_N"] if trans else c.kwargs["BLOCK_K"]) == 0]
        fit = [c for c in grouped if bm * c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"] <= 64 * 32 * c.num_warps]
        if wbits == 4:
            fit = unless_few_tokens(fit)
        out = pick_splits(fit, lambda c: cdiv(n, c.kwargs["BLOCK_N"]), lambda c: cdiv(k, c.kwargs["BLOCK_K"]), sms,
                          lambda c: (c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps), unsplit_when_full=True)
        # the fallback keeps the group rule: a K step (resp. N tile) in one group is what the ALIGNED kernels assume
        return out or fit[:1] or grouped[:1] or configs[:1]
    return prune


def mm_fits(configs, m, fma, smem, need):
    """The tensor-core configs for m tokens: decode (<= SPLIT_MAX_M) keeps one BLOCK_M (the token count rounded up
    to 16, 32 or 64; with ``fma``, fp32 x without TF32, at most 32 unless the config splits x for the tensor cores,
    SPLIT_X) and any SPLIT_K; prefill keeps SPLIT_K 1 and BLOCK_M from 64 up to the token count. ``need(c)``: the
    config's shared memory, <= smem."""
    mb = next_pow2(m)
    decode = m <= SPLIT_MAX_M
    fit = []
    for c in configs:
        bm = c.kwargs["BLOCK_M"]
        if decode:
            if bm != min(max(mb, 16), 32 if fma and not c.kwargs.get("SPLIT_X") else 64):
                continue
        elif c.kwargs["SPLIT_K"] > 1 or bm < 64 or bm > max(mb, 64):
            continue
        if need(c) > smem:
            continue
        fit.append(c)
    return fit


def _fp32_spills(c, trans):
    """fp32 x (TF32) on 4 warps: a 128 x 128 weight tile only for 16 tokens, and never transposed. At 32, the decode
    tile's sm_90 compile spilled 224 B a thread (Triton 3.6; the 16-bit one kept all in registers, as did every
    other config); transposed (the tile scaled before the dot), 56 B at 16 tokens (Triton 3.9)."""
    return c.num_warps == 4 and c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"] > 8192 and c.kwargs["BLOCK_M"] > (
        0 if trans else 16)


def _split3_spills(c, fp16=False):
    """SPLIT3 (INT4, a bf16 x with a float32 result: the weight tile split in three bf16 parts in registers): more
    than 80 values a thread of weight tile plus accumulator, BLOCK_N (BLOCK_K + BLOCK_M) / (32 warps). sm_90 compiles
    of the transposed tiles (BLOCK_M x BLOCK_N x BLOCK_K, warps; Triton 3.9): 16x64x64, 16x128x64, 16x64x128,
    32x64x64, 64x64x64 (4) kept everything in 129-253 registers, 32x64x128 (4, 80 a thread) spilled 8 B; spilled
    24-1200 B: 16x128x128, 32x128x64, 64x128x64, 64x64x128, 128x64x64 (4), 128x128x64, 128x128x128 (8). 64x256x64 on
    8 warps (128 a thread) did not spill, and is left out with the rest.
    ``fp16``: an fp16 x, its tile also split in two bf16 parts (five products): of the tiles kept for bf16, those with
    more than 96 values a thread counting the x tile (BLOCK_M BLOCK_K) too: 32x64x128 spilled 48 B; 16x64x64,
    16x128x64, 16x64x128, 32x64x64 and 64x64x64 (4) kept everything in 142-254 registers, and 256x64x64 (8), which
    bf16 keeps, spilled 112 B (sm_90, Triton 3.9)."""
    bm, bn, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
    return bn * (bk + bm) > 80 * 32 * c.num_warps or (fp16 and bn * (bk + bm) + bm * bk > 96 * 32 * c.num_warps)


def _kind_fits(c, fma, split_x, x_bytes, trans):
    """Whether config ``c`` is of the kind the call runs: a float32 x without TF32 (``fma``) takes the FMA tiles
    (BLOCK_K <= 32) and, where ``split_x`` (FLOAT32_X_SPLIT), the SPLIT_X tiles that do not spill; any other x the
    tensor-core tiles (BLOCK_K >= 64) without SPLIT_X, those of a float32 x (TF32) that do not spill."""
    if c.kwargs.get("SPLIT_X"):
        return split_x and not _split_x_spills(c)
    return (c.kwargs["BLOCK_K"] <= 32) == fma and not (x_bytes == 4 and _fp32_spills(c, trans))


def _split_x_spills(c):
    """SPLIT_X (a float32 x tile split in three bf16 parts in registers, the weight tile, the accumulator and the
    step's dot): tiles of at least 2048 x values or 4096 weight values a warp. sm_90 compiles (Triton 3.9, int8 g128
    and INT4 g64, both transposes; BLOCK_M x BLOCK_N x BLOCK_K, warps): on 4 warps 32x128x128 spilled 176-296 B a
    thread, 16x128x128, 64x64x128 and 128x64x64 reached 255 registers with 16-32 B of stack; the tiles kept took
    91-255 registers and no stack (64x128x64 on 4 warps: 242-248; 128x128x64 and 64x256x64 on 8: 224-255)."""
    bm, bn, bk, w = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps
    return bm * bk >= 2048 * w or bn * bk >= 4096 * w


def make_mm_pruner(trans, wbits):
    def prune(configs, named_args, **kwargs):
        m, n, k, g = named_args["M"], named_args["N"], named_args["K"], named_args["G"]
        x = named_args["x_ptr"]
        sms, smem = device_info(x.device)
        fma = kwargs["PRECISION"] == "ieee" and x.dtype == torch.float32  # BLOCK_K <= 32 configs, else >= 64
        split_x = fma and FLOAT32_X_SPLIT
        split3 = kwargs.get("SPLIT3", False)
        shaped = [c for c in configs
                  if not g % c.kwargs["BLOCK_N" if trans else "BLOCK_K"]
                  and _kind_fits(c, fma, split_x, x.element_size(), trans)
                  and not (split3 and not c.kwargs["SCALE_AFTER_DOT"]
                           and _split3_spills(c, x.dtype == torch.float16))]

        def need(c):  # pipelined x and weight tiles + one dequantized tile (+ layout conversions; SPLIT_X: x's parts)
            bm, bn, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
            parts = 3 * bm * bk * 2 if c.kwargs.get("SPLIT_X") else 0
            return (c.num_stages * (bm * bk * x.element_size() + bn * bk * wbits // 8) + bn * bk * x.element_size()
                    + parts)

        fit = mm_fits(shaped, m, fma, smem, need)
        if m > SPLIT_MAX_M:
            return fit or configs[-1:]
        out = pick_splits(fit, lambda c: cdiv(n, c.kwargs["BLOCK_N"]) * cdiv(m, c.kwargs["BLOCK_M"]),
                          lambda c: cdiv(k, c.kwargs["BLOCK_K"]), sms,
                          lambda c: (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps,
                                     c.num_stages), unsplit_when_full=True)
        return out or fit[:1] or configs[:1]
    return prune


def _largest_divisor(g, choices):
    return next((c for c in choices if g % c == 0), None)


def mm_k_step(G, aligned, fma):
    """The fixed untransposed tensor-core config's K step for a weight of groups of G: a step inside one group, so
    that the dot of the weight's exact integers is scaled after it (SCALE_AFTER_DOT); None where none fits (rows not
    whole groups, or a group no step divides: the weight is then dequantized, and rounded to x's dtype for the dot).
    Every tuned config (G % TUNE_GROUP == 0) has one too. ``fma``: float32 x on FMA units (steps of 16)."""
    return _largest_divisor(G, (16,) if fma else (64, 32, 16)) if aligned else None


class DequantMatmul:
    """int8_matmul / int4_matmul's launch: the GEMV and tensor-core kernels of one weight format, their config spaces
    (one tuner per kernel and transpose) and plans. ``tune_min()``: the weight size from which the op tunes (read per
    call, so a test can lower it)."""

    def __init__(self, gemv_kernel, mm_kernel, wbits, tune_min):
        self.tune_min = tune_min
        self.ops = {}
        for trans in (False, True):
            gemv = Launcher(gemv_kernel, space(lambda: gemv_configs(trans, wbits), gemv_interpreter_config(trans)),
                            GEMV_KEY, make_gemv_pruner(trans, wbits))
            mm = Launcher(mm_kernel, space(lambda: mm_configs(trans), mm_interpreter_config(trans)), MM_KEY,
                          make_mm_pruner(trans, wbits))
            self.ops[trans] = SplitKMatmul(gemv, mm, "BLOCK_N")

    def autotuners(self):
        """(gemv, gemv transposed, mm, mm transposed) triton Autotuners."""
        return tuple(getattr(self.ops[t], k).autotuner for k in ("gemv", "mm") for t in (False, True))

    def __call__(self, x, wargs, y, N, K, G, transpose, aligned):
        """y (M x N) = x (M x K, any strides) @ B for the weight pointers ``wargs``; see the section comment."""
        M = x.shape[0]
        if M == 0 or N == 0:
            return y
        if K == 0:
            return y.zero_()
        tune = aligned and G % TUNE_GROUP == 0 and N * K >= self.tune_min()
        key = self.plan_key(x, y, N, K, G, aligned, tune)
        return self.ops[transpose](key, (x, *wargs), y, (M, N, K, G, x.stride(0), x.stride(1)), M, N,
                                   lambda gemv: self._setup(gemv, key, transpose))

    @staticmethod
    def plan_key(x, y, N, K, G, aligned, tune):
        """Everything a launch plan depends on: shapes, the group, tuned or not, the dot precision, dtypes, device,
        and whether a float32 x without TF32 is split for the tensor cores (FLOAT32_X_SPLIT)."""
        precision = dot_precision(x)
        split_x = precision == "ieee" and x.dtype == torch.float32 and FLOAT32_X_SPLIT
        return (x.shape[0], N, K, G, aligned, tune, precision, x.dtype, x.device, y.dtype, split_x)

    @staticmethod
    def _setup(gemv, key, transpose):
        M, N, K, G, aligned, tune, precision, dtype, device, out_dtype, split_x = key
        mb = next_pow2(M)
        bucket = (mb,) + key[1:]
        if gemv:
            meta = dict(TRANS=transpose, BLOCK_M=mb)
        else:
            meta = dict(TRANS=transpose, **dot_meta(device, dtype, precision))
            split3 = dtype in (torch.bfloat16, torch.float16) and out_dtype == torch.float32  # INT4's float32 out
            if split3:
                meta["SPLIT3"] = True  # (the kernel's doc)
            if split3 or split_x:  # bf16 dots of split parts: under the interpreter as dot_meta's (fp16 too)
                meta.update(dot_meta(device, torch.bfloat16, precision))
        if tune:  # every tuned BLOCK_K divides 128 or G (a divisor of K)
            return dict(meta, ALIGNED=True, EVEN_K=K % 128 == 0), None, bucket
        if gemv:
            if transpose:
                bn = _largest_divisor(G, (64, 32, 16)) if aligned else None
                cfg = dict(BLOCK_N=bn or 32, BLOCK_K=max(16, min(64, 4096 // (mb * (bn or 32)))))
            else:
                bk = _largest_divisor(G, (128, 64, 32, 16)) if aligned else None
                cfg = dict(BLOCK_K=bk or 32, BLOCK_N=max(8, min(64, 4096 // (mb * (bk or 32)))))
            ok = (bn if transpose else bk) is not None
        else:
            # FMA dot (a float32 x without TF32, unless ALIGNED tiles split x for the tensor cores): small tiles
            # (sm_90: no spills)
            step = _largest_divisor(G, (64, 32, 16)) if aligned else None  # a tile inside one group (G % 16 == 0)
            ok = step is not None
            fma = precision == "ieee" and dtype == torch.float32 and not (split_x and ok)
            bm = min(max(mb, 16), 32 if fma else 64)
            if transpose:
                cfg = dict(BLOCK_M=bm, BLOCK_N=step or 64, BLOCK_K=16 if fma else 32, SCALE_AFTER_DOT=False)
            else:
                bk = mm_k_step(G, aligned, fma)
                cfg = dict(BLOCK_M=bm, BLOCK_N=64, BLOCK_K=bk or (16 if fma else 32), SCALE_AFTER_DOT=ok)
            if split_x and ok:
                cfg["SPLIT_X"] = True
        meta.update(ALIGNED=ok, EVEN_K=K % cfg["BLOCK_K"] == 0)
        return meta, config(4, 1 if gemv else 2, SPLIT_K=1, **cfg), bucket
