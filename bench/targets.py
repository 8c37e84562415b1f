"""The open issues' GPU targets, judged from the files a GPU run writes: one table, each row met, MISSED or not
measured, with the figure and the row it comes from.

    python -m bench.targets [FILE ...] [--style text|brief|markdown] [--issues 24,25] [--docs docs/targets.md]

FILEs are what ``make gpu-check`` leaves in bench/results/ (and in its OUT folder): GPU reports
(``*-gpu-report.json``, from bench/gpu_report.py: the default sections and the targeted ones, ``galore_issue25``,
``qgalore_fused``, ``compress``), training runs (``train-*.json`` of ``weightkit train``: the 350m and 7b rows) and
the check's own ``summary.txt`` (#23's time limits). Without FILEs: the newest GPU report of bench/results/ and the
GPU training runs of that day. ``scripts/gpu_check.sh`` prints the table at the top of its summary.txt.

How a row is judged:

* every ratio is between two rows of the same file (one run, one GPU), as the issues ask;
* a layer's or an op's figure is what ``auto`` ran where the report's ``auto`` section measured it (what a user
  gets), else the fastest backend's (named); the fastest backend's figure is shown beside auto's;
* "kernel time" rows need the CUDA-graph replay's ``kernel_ms``; a row without it is not measured (the 2026-11-26
  run predates the replay);
* a target over several sizes (1 and 16 tokens, two GaLore shapes, ...) is met when every size is, MISSED when one
  is, and not measured when one is missing and none missed;
* where several files measured a row, the last one given (the newest) is judged;
* a decode row (kernel time) and MemoryLinear's 1024-token forward also show their bytes bound: the best figure a
  kernel could reach moving only the bytes it must (the weight's or the tables' rows a token hashes to, the
  activations) at the copy bandwidth the same run measured; a miss that even the bound misses is marked "past the
  bytes bound on this device" (e.g. MemoryLinear at 16 tokens reads twice a 4096^2 bf16 weight's bytes).

The sizes looked for are bench/gpu_report's (QUANT_D, MEM_D, ...), so a report made at other sizes (the tests' toy
run) is judged at its own sizes. Nothing here needs a GPU.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from bench import gpu_report as gr

MET, MISSED, UNMEASURED = "met", "MISSED", "not measured"


@dataclass
class Part:
    """One size of a target: its figure (None: not measured, ``why`` says why) and where it comes from."""
    label: str
    value: Optional[float] = None
    shown: str = ""
    why: str = ""
    bound: Optional[float] = None  # the best figure the bytes it must move allow at the run's copy bandwidth


@dataclass
class Verdict:
    issue: int
    what: str
    target: str
    status: str = UNMEASURED
    measured: str = ""
    source: str = ""
    parts: List[Part] = field(default_factory=list)


class Report:
    """One GPU report (bench/gpu_report.py's JSON): its measured rows by (section, name)."""

    def __init__(self, path: str, data: Dict):
        self.file = os.path.basename(path)
        self.rows = {(r.get("section"), r.get("name")): r for r in data.get("rows", [])}
        self.skipped = list(data.get("skipped", []))
        self.meta = data.get("meta", {})
        self.copy_GBps = data.get("copy_GBps")  # the run's measured copy bandwidth (its ceilings section)

    def copy_ms(self, nbytes) -> Optional[float]:
        """The time ``nbytes`` take at the run's copy bandwidth (None without it, or without bytes)."""
        return nbytes / self.copy_GBps / 1e6 if nbytes and self.copy_GBps else None

    def get(self, section: str, name: str) -> Optional[Dict]:
        r = self.rows.get((section, name))
        return r if r is not None and "error" not in r and r.get("ms") is not None else None

    def why_not(self, section: str, name: str) -> str:
        r = self.rows.get((section, name))
        if r is not None and "error" in r:
            return f"{name!r}: {r['error'][:100]}"
        for s in self.skipped:
            if s.startswith(f"{section}/{name}:"):
                return f"{name!r} skipped: {s.split(':', 1)[1].strip()[:100]}"
        return f"no row {section}/{name!r}"

    def names(self, section: str, pattern: str) -> List[Tuple[re.Match, str]]:
        """The measured rows of ``section`` whose name matches ``pattern`` (whole), with the match."""
        out = []
        for (sec, name), r in self.rows.items():
            m = re.fullmatch(pattern, name or "") if sec == section else None
            if m and "error" not in r and r.get("ms") is not None:
                out.append((m, name))
        return out


class Train:
    """One ``weightkit train`` JSON: its methods' results and its config."""

    def __init__(self, path: str, data: Dict):
        self.file = os.path.basename(path)
        self.config = data.get("config", {})
        self.device = data.get("device", "")
        self.results = {r["method"]: r for r in data.get("results", []) if not r.get("error")}

    def step_ms(self, method: str) -> Optional[float]:
        r = self.results.get(method)
        if r is None:
            return None
        if r.get("step_ms_median"):
            return float(r["step_ms_median"])
        tps = r.get("tokens_per_s_median") or r.get("tokens_per_s")
        tokens = self.config.get("batch_size", 0) * self.config.get("seq_len", 0)
        return 1e3 * tokens / tps if tps and tokens else None


class Summary:
    """A gpu-check summary.txt: its verdict, seconds and stages (first line)."""

    LINE = re.compile(r"gpu-check: (?P<verdict>.+?) \((?P<s>\d+) s(?P<fin>, finished)?; stages run: (?P<stages>[^;]*);")

    def __init__(self, path: str, text: str):
        self.file = os.path.basename(path)
        m = self.LINE.match(text.splitlines()[0] if text else "")
        self.ok = bool(m and m["verdict"] == "ok" and m["fin"])
        self.seconds = int(m["s"]) if m else None
        self.stages = set(m["stages"].split(",")) if m else set()
        self.finished = bool(m and m["fin"])


def load(paths: Sequence[str]):
    """The files by kind; one that is none of them (or unreadable) is left out with a note."""
    reports, trains, summaries, notes = [], [], [], []
    for path in paths:
        try:
            with open(path) as f:
                text = f.read()
            if path.endswith(".txt"):
                summaries.append(Summary(path, text))
                continue
            data = json.loads(text)
        except (OSError, ValueError) as exc:
            notes.append(f"left out {path}: {type(exc).__name__}: {str(exc)[:100]}")
            continue
        if isinstance(data, dict) and "rows" in data:
            reports.append(Report(path, data))
        elif isinstance(data, dict) and "results" in data and "config" in data:
            trains.append(Train(path, data))
        else:
            notes.append(f"left out {path}: neither a GPU report, a training run nor a gpu-check summary")
    return reports, trains, summaries, notes


# -- the figures ---------------------------------------------------------------------------------------------------

def _readable(pattern: str) -> str:
    """A row-name pattern as a reader writes it: ``<backend>`` for the backend's group, ``<name>`` for another named
    group, no escapes."""
    named = re.sub(r"\(\?P<(\w+)>(?:[^()]|\([^()]*\))*\)", lambda m: "<backend>" if m[1] == "b" else f"<{m[1]}>",
                   pattern)
    return re.sub(r"\\(.)", r"\1", named)


def _ratio(rep: Report, row: Tuple[str, str], base: Tuple[str, str], key: str) -> Tuple[Optional[float], str]:
    """base[key] / row[key] (> 1: the row is faster), or None and why."""
    r, b = rep.get(*row), rep.get(*base)
    if r is None:
        return None, rep.why_not(*row)
    if b is None:
        return None, "baseline " + rep.why_not(*base)
    if key not in r or key not in b:
        missing = " and ".join(repr(x[1]) for x, y in ((row, r), (base, b)) if key not in y)
        return None, f"no {key} in {missing}" + (f" ({r['graph_error'][:80]})" if "graph_error" in r else "")
    return b[key] / r[key], ""


def _field(rep: Report, row: Tuple[str, str], key: str) -> Tuple[Optional[float], str]:
    r = rep.get(*row)
    if r is None:
        return None, rep.why_not(*row)
    return (r[key], "") if r.get(key) is not None else (None, f"no {key} in {row[1]!r}")


def _layer(rep: Report, label: str, auto_row: Optional[Tuple[str, str]], backend_rows: Tuple[str, str],
           figure: Callable[[Tuple[str, str]], Tuple[Optional[float], str]], fmt: Callable[[float], str],
           higher_is_better: bool = True) -> Part:
    """What auto ran where the auto section measured it, else the best backend's figure (named). ``backend_rows``:
    (section, name pattern, its group ``b`` the backend); ``figure(row)`` gives a row's figure or why not."""
    best, best_b, why = None, None, ""
    rows = rep.names(*backend_rows)
    for m, name in rows:
        v, w = figure((backend_rows[0], name))
        if v is None:
            why = why or w
        elif best is None or (v > best if higher_is_better else v < best):
            best, best_b = v, " ".join(g for g in (m["b"], m.groupdict().get("mode")) if g)
    if not rows:
        why = f"no row {backend_rows[0]}/{_readable(backend_rows[1])!r}"
    auto_v = figure(auto_row)[0] if auto_row is not None else None
    if auto_v is not None:
        best_shown = f"; best {best_b} {fmt(best)}" if best is not None else ""
        return Part(label, auto_v, f"{fmt(auto_v)} (auto){best_shown}")
    if best is not None:
        return Part(label, best, f"{fmt(best)} ({best_b}" + ("; auto not measured)" if auto_row else ")"))
    return Part(label, None, "", why)


def _x(v):
    return f"{v:.2f}x"


def _time_x(v):
    return f"{1 / v:.2f}x the time"


def _ms(v):
    return f"{v:.3f} ms" if v < 10 else f"{v:.1f} ms"


def _pct(v):
    return f"{v:.0f}% of copy"


def _speed(rep, section, label, auto_name, pattern, base, key, fmt=_x, need=None) -> Part:
    """A layer's speed over ``base`` (a row of ``section``) by ``key`` (ms or kernel_ms): > 1 is faster. With
    ``need`` (the bytes the layer must move, or "rows": the ``bytes`` its rows recorded), its bytes bound too: the
    most it could be faster than ``base``, were it to move them at the run's copy bandwidth."""
    part = _layer(rep, label, ("auto", auto_name) if auto_name else None, (section, pattern),
                  lambda row: _ratio(rep, row, (section, base), key), fmt)
    if need == "rows":
        need = next((rep.rows[(section, name)].get("bytes") for _, name in rep.names(section, pattern)), None)
    floor, b = rep.copy_ms(need), rep.get(section, base)
    if part.value is not None and floor and b is not None and b.get(key):
        part.bound = b[key] / floor
        part.shown += f"; bytes bound {fmt(part.bound)}"
    return part


def _time(rep, section, label, auto_name, pattern, need=None) -> Part:
    """A layer's time; with ``need`` (bytes it must move), its floor at the run's copy bandwidth too."""
    part = _layer(rep, label, ("auto", auto_name) if auto_name else None, (section, pattern),
                  lambda row: _field(rep, row, "ms"), _ms, higher_is_better=False)
    floor = rep.copy_ms(need)
    if part.value is not None and floor:
        part.bound = floor
        part.shown += f"; bytes floor {_ms(floor)}"
    return part


# -- judging -------------------------------------------------------------------------------------------------------

@dataclass
class Spec:
    """A target judged from GPU reports: ``parts(report)`` gives its figures (one a size), ``ok`` tests one (or one
    test a part)."""
    issue: int
    what: str
    target: str
    parts: Callable[[Report], List[Part]]
    ok: object


def _src(rep: Report) -> str:
    meta = rep.meta
    what = ", ".join(str(x) for x in (meta.get("device"), meta.get("date"), meta.get("torch") and
                                      f"torch {meta['torch']}", meta.get("triton") and f"triton {meta['triton']}") if x)
    return f"{rep.file}" + (f" ({what})" if what else "")


def evaluate(spec: Spec, reports: Sequence[Report]) -> Verdict:
    """Each part from the last report that measured it (each figure from one file), then met when every part is
    measured and passes, MISSED when a measured part fails, else not measured."""
    parts, sources = None, []
    for rep in reports or [Report("(no GPU report)", {})]:
        got = spec.parts(rep)
        if parts is None:
            parts, sources = got, [None] * len(got)
        for i, p in enumerate(got):
            if p.value is not None or parts[i].value is None:
                parts[i], sources[i] = p, (_src(rep) if p.value is not None else None)
    tests = list(spec.ok) if isinstance(spec.ok, (list, tuple)) else [spec.ok] * len(parts)
    v = Verdict(spec.issue, spec.what, spec.target, parts=parts)
    v.measured = "; ".join((f"{p.label}: " if p.label else "") + (p.shown if p.value is not None else f"- ({p.why})")
                           for p in parts)
    measured = [(p, t) for p, t in zip(parts, tests) if p.value is not None]
    if any(not t(p.value) for p, t in measured):
        v.status = MISSED
        beyond = [p.label or "it" for p, t in measured if not t(p.value) and p.bound is not None and not t(p.bound)]
        if beyond:  # no kernel could meet it there: the bytes alone take longer at the run's copy bandwidth
            v.measured += f" [past the bytes bound on this device: {', '.join(beyond)}]"
    elif measured and len(measured) == len(parts):
        v.status = MET
    v.source = "; ".join(dict.fromkeys(s for s in sources if s))
    return v


# -- the targets of the GPU reports --------------------------------------------------------------------------------

def _tokens(ts):
    return ", ".join(map(str, ts))


def report_specs() -> List[Spec]:
    """#24, #25 and #26's rows that bench/gpu_report measures, at its sizes."""
    d = gr.QUANT_D
    decode = [t for t in gr.QUANT_TOKENS if t <= 16]
    prefill = [t for t in gr.QUANT_TOKENS if t >= 256]
    most = max(gr.QUANT_TOKENS)

    def int8(key, tokens):
        return lambda rep: [_speed(rep, "quant", f"{t} tok", f"Int8Linear g128 bf16 {t} tok",
                                   rf"Int8Linear g128 (?P<b>\w+) {t} tok", f"bf16 nn.Linear {t}x{d}x{d}", key,
                                   need="rows" if key == "kernel_ms" else None)
                            for t in tokens]

    def int8_fwd_bwd(rep):
        return [_speed(rep, "quant", f"{most} tok", f"Int8Linear g128 bf16 fwd+bwd {most} tok",
                       rf"Int8Linear fwd\+bwd (?P<b>\w+) {most} tok", f"bf16 nn.Linear fwd+bwd {most} tok", "ms",
                       _time_x)]

    def int4(rep):
        return [_speed(rep, "quant", f"{t} tok", None, rf"int4_matmul g64 (?P<b>\w+) {t} tok",
                       f"bf16 nn.Linear {t}x{d}x{d}", "kernel_ms", need="rows") for t in decode]

    def bandwidth(rep):
        return [_layer(rep, label, None, ("quant", pattern), lambda row: _field(rep, row, "pct_copy_bw"), _pct)
                for label, pattern in (("int8_sr_update_", rf"int8_sr_update_ {d}\^2 (?P<b>\w+)"),
                                       ("quantize_int4", rf"quantize_int4 {d}\^2 g64 (?P<b>\w+)"))]

    def precision(rep):  # per shape of bench/qgalore_fused.measure (its rows' names hold str(shape))
        import inspect

        from bench import qgalore_fused

        shapes = gr.QGALORE_FUSED_SIZES.get("shapes") or \
            inspect.signature(qgalore_fused.measure).parameters["shapes"].default
        parts = []
        for m, n, r, left in shapes:
            shape = str([m, n, r, "left" if left else "right"])
            rows = {name[len(f"precision: {shape} "):]: row for (sec, name), row in rep.rows.items()
                    if sec == "qgalore_fused" and name.startswith(f"precision: {shape} ")}
            base = rows.get("float32 matmul (galore-torch's)")
            for prec in ("bf16x3", "tf32x3"):
                row, p = rows.get(f"write-back product {prec}"), Part(f"{m}x{n} r{r} {prec}")
                if row is None or base is None or "rel_err" not in row or "rel_err" not in base:
                    p.why = "no qgalore_fused precision rows (a targeted call: REPORT_SECTIONS=qgalore_fused)"
                else:
                    p.value = row["rel_err"] / base["rel_err"]
                    p.shown = f"{row['rel_err']:.2e} = {p.value:.2f}x galore-torch's {base['rel_err']:.2e}"
                parts.append(p)
        return parts

    specs = [
        Spec(24, f"Int8Linear {d}² g128, {_tokens(decode)} tokens, kernel time (CUDA-graph replay)",
             ">= 1.5x faster than bf16 nn.Linear", int8("kernel_ms", decode), lambda s: s >= 1.5),
        Spec(24, f"Int8Linear {d}² g128, {_tokens(decode)} tokens, eager calls back to back",
             "not slower than bf16 nn.Linear", int8("ms", decode), lambda s: s >= 1.0),
        Spec(24, f"Int8Linear {d}² g128, {_tokens(prefill)} tokens, forward", "<= 1.1x bf16 nn.Linear's time",
             int8("ms", prefill), lambda s: s >= 1 / 1.1),
        Spec(24, f"Int8Linear {d}² g128, forward + backward at {most} tokens", "<= 1.25x bf16 nn.Linear's time",
             int8_fwd_bwd, lambda s: s >= 1 / 1.25),
        Spec(24, f"int4_matmul {d}² g64, {_tokens(decode)} tokens, kernel time (CUDA-graph replay)",
             ">= 2.5x faster than bf16 nn.Linear", int4, lambda s: s >= 2.5),
        Spec(24, f"int8_sr_update_ {d}² g128; quantize_int4 {d}² g64", ">= 70% of the copy bandwidth", bandwidth,
             lambda v: v >= 70),
        Spec(24, "Q-GaLore fused write-back's product error against float64 (item 1's precision contract)",
             "within 2x galore-torch's float32 product's", precision, lambda v: v <= 2.0),
    ]
    specs += _galore_specs() + _memory_dict_specs()
    return specs


def _galore_specs() -> List[Spec]:
    """#25: steps (galore_issue25's rows where measured, else the default galore section's), refresh, syncs. The
    two sections' shapes: bench/galore_issue25's CASES and REFRESH, gpu_report's GALORE_SHAPES and REFRESH_SHAPE (the
    same, the issue's, but in the tests' toy runs)."""
    from bench import galore_issue25 as g25

    def tag(shape):
        (m, n), r = shape
        return f"{m}x{n} r{r}"

    pairs = [(tag(a), tag(b)) for a, b in zip(g25.CASES, gr.GALORE_SHAPES)]  # (galore_issue25's, galore's)
    # per kind: (galore_issue25 row, its base), (galore section row, its base)
    rows = {
        "tf32": lambda t, u: ((f"weightkit GaLoreAdamW auto raise tf32 {t}", f"galore-torch tf32 {t}"),
                              (f"weightkit GaLoreAdamW auto tf32 {u}", f"galore-torch tf32 {u}")),
        "bf16": lambda t, u: ((f"weightkit GaLoreAdamW proj bf16 auto raise {t}", f"galore-torch tf32 {t}"),
                              (f"weightkit GaLoreAdamW proj bf16 tf32 {u}", f"galore-torch tf32 {u}")),
        "strict": lambda t, u: ((f"weightkit GaLoreAdamW auto raise strict fp32 {t}", f"galore-torch strict fp32 {t}"),
                                (f"weightkit GaLoreAdamW auto fp32 {u}", f"galore-torch fp32 {u}")),
        "8bit": lambda t, u: ((f"weightkit GaLoreAdamW8bit auto raise tf32 {t}",
                               f"weightkit GaLoreAdamW auto raise tf32 {t}"),
                              (f"weightkit GaLoreAdamW8bit tf32 {u}", f"weightkit GaLoreAdamW auto tf32 {u}")),
    }

    def step(kind):
        def parts(rep):
            res = []
            for t, u in pairs:
                p, why = Part(t), []
                for (name, base), section in zip(rows[kind](t, u), ("galore_issue25", "galore section")):
                    sec = section.split()[0]
                    v, w = _ratio(rep, (sec, name), (sec, base), "ms")
                    if v is not None:
                        p.value, p.shown = v, f"{_time_x(v) if kind == '8bit' else _x(v)} ({section})"
                        break
                    why.append(w)
                p.why = "" if p.value is not None else " / ".join(why)
                res.append(p)
            return res
        return parts

    size, rank = gr.REFRESH_SHAPE
    size25, rank25 = g25.REFRESH

    def refresh(rep):
        p = Part("")
        default = f"refresh randomized {size}^2 r{rank}"
        r = rep.get("galore", default)
        if r is not None:
            p.value, p.shown = r["ms"], f"{_ms(r['ms'])} (the default call)"
        found = rep.names("galore_issue25", rf"refresh randomized (?P<b>\w+) range (\w+) (tf32|strict fp32) "
                                            rf"{size25}\^2 r{rank25}")
        if found:
            ms, best = min((rep.get("galore_issue25", name)["ms"], name) for _, name in found)
            if p.value is None:
                p.value, p.shown = ms, f"{_ms(ms)} ({best})"
            else:
                p.shown += f"; fastest setting {_ms(ms)} ({best})"
        if p.value is None:
            p.why = rep.why_not("galore", default)
        return [p]

    def syncs(rep):
        parts = []
        for nonfinite, most in (("raise", 1), ("skip", 0)):
            for kind in ("GaLoreAdamW", "GaLoreAdamW8bit"):
                name = f"host syncs per step {kind} {nonfinite}"
                r, p = rep.rows.get(("galore_issue25", name)), Part(f"{kind} {nonfinite}")
                if r is not None and "syncs" in r:
                    p.value, p.shown = r["syncs"] - most, f"{r['syncs']} (at most {most})"
                else:
                    p.why = rep.why_not("galore_issue25", name)
                parts.append(p)
        return parts

    both = " and ".join(t for t, _ in pairs)
    return [
        Spec(25, f"GaLoreAdamW step, TF32 allowed, {both}", ">= 1.5x faster than galore-torch with TF32",
             step("tf32"), lambda s: s >= 1.5),
        Spec(25, f"GaLoreAdamW step, proj_dtype=bfloat16, {both}", ">= 2.5x faster than galore-torch with TF32",
             step("bf16"), lambda s: s >= 2.5),
        Spec(25, f"GaLoreAdamW step, strict fp32, {both}", "not slower than galore-torch strict", step("strict"),
             lambda s: s >= 1.0),
        Spec(25, f"GaLoreAdamW8bit step, TF32 allowed, {both}", "<= 1.2x GaLoreAdamW's time", step("8bit"),
             lambda s: s >= 1 / 1.2),
        Spec(25, f"randomized refresh {size}² r{rank}", "<= 50 ms", refresh, lambda ms: ms <= 50),
        Spec(25, "host syncs in one steady-state step", "<= 1 with nonfinite='raise', 0 with 'skip'", syncs,
             lambda extra: extra <= 0),
    ]


def memory_linear_bytes(d: int, tokens: int, tau: int = 8, itemsize: int = 2) -> float:
    """The bytes a MemoryLinear d -> d forward of ``tokens`` random tokens must move at least: each table's rows that
    some token hashes to (expected distinct of 2^tau buckets drawn ``tokens`` times), read once, and the bf16 input
    and output. 16 tokens read about 15.5 rows of each table (62 MiB at d 4096), twice a 4096^2 bf16 weight."""
    buckets = 2**tau
    rows = d // tau * buckets * (1.0 - (1.0 - 1.0 / buckets) ** tokens)
    return rows * d * itemsize + 2 * tokens * d * itemsize


def _memory_dict_specs() -> List[Spec]:
    """#26: MemoryLinear and DictLinear against bf16 nn.Linear; the compressor."""
    d = gr.MEM_D
    decode = [t for t in gr.MEM_TOKENS if t <= 16]
    most = max(gr.MEM_TOKENS)

    def mem_decode(rep):
        return [_speed(rep, "memoryformer", f"{t} tok", f"MemoryLinear torch.bfloat16 {t} tok",
                       rf"MemoryLinear bfloat16 (?P<b>\w+) {t} tok", f"bf16 nn.Linear {d}^2 {t} tok", "kernel_ms",
                       need=memory_linear_bytes(d, t)) for t in decode]

    def mem_prefill(rep):
        return [_time(rep, "memoryformer", f"{most} tok", f"MemoryLinear torch.bfloat16 {most} tok",
                      rf"MemoryLinear bfloat16 (?P<b>\w+) {most} tok", need=memory_linear_bytes(d, most))]

    def mem_fwd_bwd(deterministic):
        def parts(rep):
            return [_time(rep, "memoryformer", tname,
                          None if deterministic else f"MemoryLinear torch.{tname} fwd+bwd {most} tok",
                          rf"MemoryLinear fwd\+bwd {tname} (?P<b>\w+) {most} tok deterministic" if deterministic
                          else rf"MemoryLinear fwd\+bwd {tname} (?P<b>\w+) {most} tok table grad (?P<mode>\w+)")
                    for tname in ("float32", "bfloat16")]
        return parts

    from weightkit.nn.ksvd import dictionary_size

    dd, k, s = gr.DICT
    ka, sa = dictionary_size(dd, dd, 0.3, value_bytes=2)  # the auto section's layer (gr.DICT's at the report's sizes)
    ddecode = [t for t in gr.DICT_TOKENS if t <= 16]
    dprefill = [t for t in gr.DICT_TOKENS if t >= 256]
    dmost = max(gr.DICT_TOKENS)

    def dict_rows(key, tokens):
        return lambda rep: [_speed(rep, "dictionary", f"{t} tok", f"DictLinear bf16 k{ka} s{sa} {t} tok",
                                   rf"DictLinear bf16 k{k} s{s} \((?P<fewer>[\w% ]*)\) (?P<b>\w+) {t} tok",
                                   f"bf16 nn.Linear {t} tok", key, need="rows" if key == "kernel_ms" else None)
                            for t in tokens]

    def dict_fwd_bwd(rep):
        return [_speed(rep, "dictionary", f"{dmost} tok", f"DictLinear bf16 k{ka} s{sa} fwd+bwd {dmost} tok",
                       rf"DictLinear bf16 k{k} s{s} \((?P<fewer>[\w% ]*)\) fwd\+bwd (?P<b>\w+) {dmost} tok",
                       f"bf16 nn.Linear fwd+bwd {dmost} tok", "ms", _time_x)]

    def compress(pattern, gap):
        def parts(rep):
            p, q = Part("seconds"), Part("vs the 2-core CPU" if not gap else "cosine gap to the CPU run")
            found = rep.names("compress", pattern)
            if not found:
                p.why = q.why = "no compress rows (a targeted call: REPORT_SECTIONS=compress)"
                return [p, q]
            name = found[-1][1]
            r = rep.get("compress", name)
            p.value, p.shown = r["ms"] / 1e3, f"{r['ms'] / 1e3:.1f} s ({name})"
            key = "cosine_gap" if gap else "speedup_vs_2core_cpu"
            if r.get(key) is None:
                q.why = f"no {key} in the row"
            elif gap:
                q.value, q.shown = r[key], f"{r[key]:.4f} (cosine {r.get('cosine', 0):.4f})"
            else:
                q.value, q.shown = r[key], f"{r[key]:.0f}x"
            return [p, q]
        return parts

    return [
        Spec(26, f"MemoryLinear {d}, bf16 tables, {_tokens(decode)} tokens, kernel time (CUDA-graph replay)",
             f">= 2x faster than bf16 nn.Linear {d}²", mem_decode, lambda s: s >= 2.0),
        Spec(26, f"MemoryLinear {d}, bf16 tables, {most} tokens, forward", "<= 0.35 ms", mem_prefill,
             lambda ms: ms <= 0.35),
        Spec(26, f"MemoryLinear {d}, forward + backward at {most} tokens, table gradient by atomics or segments",
             "<= 3 ms", mem_fwd_bwd(False), lambda ms: ms <= 3.0),
        Spec(26, f"MemoryLinear {d}, forward + backward at {most} tokens, deterministic", "<= 3.9 ms",
             mem_fwd_bwd(True), lambda ms: ms <= 3.9),
        Spec(26, f"DictLinear {dd}² at 30% fewer bytes, {_tokens(ddecode)} tokens, kernel time (CUDA-graph replay)",
             ">= 1.2x faster than bf16 nn.Linear", dict_rows("kernel_ms", ddecode), lambda v: v >= 1.2),
        Spec(26, f"DictLinear {dd}², {_tokens(dprefill)} tokens, forward", "<= 1.3x bf16 nn.Linear's time",
             dict_rows("ms", dprefill), lambda v: v >= 1 / 1.3),
        Spec(26, f"DictLinear {dd}², forward + backward at {dmost} tokens", "<= 1.5x bf16 nn.Linear's time",
             dict_fwd_bwd, lambda v: v >= 1 / 1.5),
        Spec(26, "compress one 4096x11008 layer at 30% (256 calibration tokens) on CUDA",
             "<= 5 s and >= 20x faster than the 2-core CPU run", compress(r"layer \d+x\d+ 30% .*", False),
             (lambda sec: sec <= 5.0, lambda x: x >= 20.0)),
        Spec(26, "MiniLM, all 37 layers at 30%, on CUDA", "<= 30 s end to end, cosine within 0.005 of the CPU run",
             compress(r"MiniLM \d+ layers .*", True), (lambda sec: sec <= 30.0, lambda gap: gap <= 0.005)),
    ]


def train_targets(trains: Sequence[Train]) -> List[Verdict]:
    """#24's and #25's end-to-end rows, from ``weightkit train`` runs on CUDA (the last run of each size wins)."""
    def newest(size, *methods):
        found = [t for t in trains if t.config.get("model_size") == size and "cpu" not in t.device.lower()
                 and all(m in t.results for m in methods)]
        return found[-1] if found else None

    def src(t):
        c, adamw = t.config, t.results.get("adamw", {})
        extra = [x for x in (c.get("checkpointing") and "checkpointing", c.get("stagger_refresh") and "staggered",
                             c.get("dtype") and f"{c['dtype']} parameters",
                             adamw.get("autocast") and f"{adamw['autocast']} autocast",
                             adamw.get("optimizer_impl") and f"adamw: {adamw['optimizer_impl']}") if x]
        return (f"{t.file} ({t.device}; {c.get('batch_size')} x {c.get('seq_len')} tokens, rank {c.get('rank')}, "
                f"{c.get('steps')} steps" + "".join(f", {x}" for x in extra) + ")")

    def ratio(t, a, b):  # a's step time / b's, or None
        ta, tb = t.step_ms(a), t.step_ms(b)
        return ta / tb if ta and tb else None

    def mb(t, m):
        return float(t.results[m]["peak_memory_mb"])

    out = []
    # #24, 309M (the 350m preset: 302.96M parameters), 8 x 512
    v = Verdict(24, "e2e 350m (303M) LLaMA-style, 8 x 512, Q-GaLore layer-wise against fused AdamW",
                "step time <= 1.3x; peak memory <= 65%")
    t = newest("350m", "qgalore-layerwise", "adamw")
    if t is None or ratio(t, "qgalore-layerwise", "adamw") is None:
        v.measured = "- (no CUDA training run of the 350m model with qgalore-layerwise and adamw)"
    else:
        time_x = ratio(t, "qgalore-layerwise", "adamw")
        mem = mb(t, "qgalore-layerwise") / mb(t, "adamw")
        v.status = MET if time_x <= 1.3 and mem <= 0.65 else MISSED
        v.measured = (f"{time_x:.2f}x the step time ({t.step_ms('qgalore-layerwise'):.1f} vs "
                      f"{t.step_ms('adamw'):.1f} ms); peak {mem:.0%} ({mb(t, 'qgalore-layerwise'):,.0f} vs "
                      f"{mb(t, 'adamw'):,.0f} MiB)")
        v.source = src(t)
    out.append(v)
    # #24, 7B shapes, 16 x 256, rank 1024, layer-wise + checkpointing
    v = Verdict(24, "LLaMA-7B shape, 16 x 256 tokens, rank 1024, Q-GaLore layer-wise + checkpointing",
                "peak <= 13 GB; tokens/s >= 0.75x fused AdamW's")
    t = newest("7b", "qgalore-layerwise")
    if t is None:
        v.measured = "- (no CUDA training run of the 7b model with qgalore-layerwise)"
    else:
        peak_gb = mb(t, "qgalore-layerwise") * 2**20 / 1e9
        parts = [f"peak {peak_gb:.2f} GB ({mb(t, 'qgalore-layerwise'):,.0f} MiB)"]
        ok = peak_gb <= 13.0
        speed = ratio(t, "adamw", "qgalore-layerwise")  # tokens/s against AdamW's
        if speed is not None:
            parts.append(f"tokens/s {speed:.2f}x AdamW's")
            v.status = MET if ok and speed >= 0.75 else MISSED
        else:
            parts.append("tokens/s: - (no adamw run beside it)")
            v.status = MISSED if not ok else UNMEASURED
        v.measured = "; ".join(parts)
        v.source = src(t)
    out.append(v)
    # #25, 350m, rank 256: GaLore step time, the longest step (staggered), layer-wise GaLore's peak
    v = Verdict(25, "e2e 350m (303M), bf16 autocast, 8 x 512, rank 256",
                "GaLore step <= fused AdamW's; longest step <= 2x median (staggered); GaLore layer-wise peak <= 75% "
                "of AdamW's")
    t = newest("350m", "adamw")
    galore = [m for m in ("galore", "galore-layerwise") if t is not None and ratio(t, m, "adamw") is not None]
    if t is None or not galore:
        v.measured = "- (no CUDA training run of the 350m model with adamw and galore or galore-layerwise)"
    else:
        bits, oks, complete = [], [], True
        for m in galore:
            x = ratio(t, m, "adamw")
            bits.append(f"{m} {x:.2f}x AdamW's step")
            oks.append(x <= 1.0)
            r = t.results[m]
            if r.get("step_ms_max") and r.get("step_ms_median"):
                spread = r["step_ms_max"] / r["step_ms_median"]
                bits.append(f"{m} longest step {spread:.2f}x median (step {r.get('step_ms_max_at')})")
                oks.append(spread <= 2.0)
            else:
                complete = False
        if not t.config.get("stagger_refresh"):
            bits.append("not staggered")
            complete = False
        if "galore-layerwise" in t.results:
            x = mb(t, "galore-layerwise") / mb(t, "adamw")
            bits.append(f"galore-layerwise peak {x:.0%}")
            oks.append(x <= 0.75)
        else:
            complete = False
        v.status = MISSED if not all(oks) else (MET if complete else UNMEASURED)
        v.measured = "; ".join(bits)
        v.source = src(t)
    out.append(v)
    return out


def check_targets(summaries: Sequence[Summary]) -> List[Verdict]:
    """#23: the whole check green within 7 minutes; a subset call under 3 minutes."""
    whole = [s for s in summaries if {"test", "report", "train"} <= s.stages]
    subset = [s for s in summaries if s not in whole and s.stages]
    out = []
    v = Verdict(23, "make gpu-check, every stage", "green, <= 420 s (machine start excluded)")
    if whole:
        s = whole[-1]
        v.status = MET if s.ok and s.seconds <= 420 else MISSED
        v.measured = f"{'ok' if s.ok else 'not green'} in {s.seconds} s"
        v.source = s.file
    else:
        v.measured = "- (no summary.txt of a whole check)"
    out.append(v)
    v = Verdict(23, "a second call with a subset of stages", "< 180 s")
    if subset:
        s = subset[-1]
        v.status = MET if s.finished and s.seconds < 180 else MISSED
        v.measured = f"{s.seconds} s ({','.join(sorted(s.stages))}{'' if s.ok else ', not green'})"
        v.source = s.file
    else:
        v.measured = "- (no summary.txt of a subset call)"
    out.append(v)
    return out


def judge(paths: Sequence[str], notes: Optional[List[str]] = None) -> List[Verdict]:
    """Every target's verdict from ``paths``; what was left out is appended to ``notes``."""
    reports, trains, summaries, left_out = load(paths)
    if notes is not None:
        notes.extend(left_out)
    by_issue = check_targets(summaries) + [evaluate(spec, reports) for spec in report_specs()] + \
        train_targets(trains)
    return sorted(by_issue, key=lambda v: v.issue)  # stable: each issue's rows in the order above


def table(verdicts: Sequence[Verdict], style: str = "text") -> str:
    """The verdicts as text (a paragraph each), ``brief`` text (a line each) or a ``markdown`` table."""
    counts = {s: sum(v.status == s for v in verdicts) for s in (MET, MISSED, UNMEASURED)}
    head = f"targets: {counts[MET]} met, {counts[MISSED]} missed, {counts[UNMEASURED]} not measured"
    if style == "markdown":
        lines = [head, "", "| issue | what | target | measured | verdict | from |", "|---|---|---|---|---|---|"]
        lines += [f"| #{v.issue} | {v.what} | {v.target} | {v.measured} | {v.status} | {v.source} |"
                  for v in verdicts]
        return "\n".join(lines)
    lines = [head]
    for v in verdicts:
        status = v.status if v.status == MISSED else v.status.upper()
        if style == "brief":
            lines.append(f"  #{v.issue} {status:<12} {v.what} ({v.target}): {v.measured or '-'}"[:300])
            continue
        lines.append(f"  #{v.issue} {status:<12} {v.what}: {v.target}")
        lines.append(f"      measured: {v.measured or '-'}")
        if v.source:
            lines.append(f"      from: {v.source}")
    return "\n".join(lines)


def default_files(results: str = "bench/results") -> List[str]:
    """The newest GPU report of ``results`` (by its own date) and the GPU reports and training runs of that day,
    oldest first, then that day's gpu-check summaries (``*<day>*gpu-check*.txt``, as committed)."""
    dated = []
    for path in glob.glob(os.path.join(results, "*.json")):
        base = os.path.basename(path)
        if base.startswith("cpu") or not ("gpu-report" in base or "train" in base):
            continue
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError):
            continue
        when = str(data.get("meta", {}).get("date") or data.get("date") or "")
        if "rows" in data or ("results" in data and "cpu" not in str(data.get("device", "")).lower()):
            dated.append((when, base, path, "rows" in data))
    reports = sorted(d for d in dated if d[3])
    if not reports:
        return []
    day = reports[-1][0][:10]
    checks = sorted(glob.glob(os.path.join(results, f"*{day}*gpu-check*.txt")))  # the calls' summary.txt
    return [d[2] for d in sorted(dated) if d[0][:10] == day] + checks


def page(files: Sequence[str]) -> str:
    """docs/targets.md: the open issues' targets judged from the newest GPU run's files in bench/results/."""
    notes: List[str] = []
    verdicts = judge(files, notes)
    used = ", ".join(f"`{os.path.basename(f)}`" for f in files) or "none"
    lines = ["# The issues' GPU targets: where they stand", "",
             "Generated by `python -m bench.targets --docs docs/targets.md` (`make docs`) from the newest GPU run's "
             f"files in `bench/results/`: {used}. Each row: met, MISSED or not measured, with the figure, the backend "
             "it comes from and what is missing; how a row is judged: [gpu.md](gpu.md) and `bench/targets.py`. A "
             "target not measured is not met.", "", table(verdicts, "markdown")]
    lines += [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="*", help="GPU reports, training runs, gpu-check summary.txt (default: the newest "
                                             "GPU run's files in bench/results/)")
    ap.add_argument("--style", choices=("text", "brief", "markdown"), default="text",
                    help="a paragraph a target (text), a line a target (brief), or a markdown table")
    ap.add_argument("--issues", default="", help="only these issues, e.g. 24,25")
    ap.add_argument("--docs", metavar="PATH", help="write the docs page (docs/targets.md) of the files instead")
    args = ap.parse_args(argv)
    files = args.files or default_files()
    if args.docs:
        with open(args.docs, "w") as f:
            f.write(page(files))
        return 0
    if not files:
        print("targets: no GPU report in bench/results/ and no files given", file=sys.stderr)
        return 2
    notes: List[str] = []
    verdicts = judge(files, notes)
    if args.issues:
        wanted = {int(x) for x in args.issues.replace("#", "").split(",") if x.strip()}
        verdicts = [v for v in verdicts if v.issue in wanted]
    print(table(verdicts, args.style))
    for note in notes:
        print(f"  ({note})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
