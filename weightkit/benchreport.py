"""Tables and plots from pytest-benchmark JSON files written by the bench/ suites.

``python -m weightkit.benchreport FILE.json [--png OUT.png]`` prints a markdown table: op, backend, shape, mean
time, GB/s (and its share of the copy bandwidth measured in the same run) or TFLOP/s, the speed-up against the
reference backend, and against every peer of the same op and shape in the same run (a peer is an entry whose
``backend`` is not a weightkit backend: nn.Linear, torch AdamW, galore-torch, ...; ratios above 1 mean weightkit is
faster). The picture answers what a user asks: per op, the speed-up over its baseline across sizes, one line per
backend and peer.

``python -m weightkit.benchreport --docs docs/benchmarks.md`` writes the benchmarks page of the docs from every
result file in ``bench/results/`` (pytest-benchmark suites, GPU reports of ``make gpu-check``, training runs), each
table headed by the device, the versions and the date of the run that produced it (``make docs`` does the same;
``tests/test_benchreport.py`` fails when the committed page differs from what the files give).
"""

from __future__ import annotations

import argparse
import json
from typing import Dict, List, Optional, Tuple

from weightkit.backend import BACKENDS


def device_tag() -> str:
    """The file-name tag of this machine's benchmark results: the GPU's name (``nvidia-h200``), else
    ``cpu-<arch>``."""
    import platform
    import re

    import torch

    name = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu-{platform.machine()}"
    return re.sub("[^A-Za-z0-9]+", "-", name).strip("-").lower()


def load(path: str) -> Dict:
    with open(path) as f:
        return json.load(f)


def _rows(data: Dict) -> List[Tuple[Tuple[str, str], Dict, float]]:
    rows = []
    for b in data["benchmarks"]:
        extra = b.get("extra_info", {})
        op = extra.get("op") or b.get("group") or b["name"].split("[")[0]
        key = (op, json.dumps(extra.get("shape"), sort_keys=True))
        rows.append((key, extra, b["stats"]["mean"]))
    return rows


def _copy_gbps(data: Dict) -> Optional[float]:
    return data.get("machine_info", {}).get("weightkit", {}).get("copy_GBps")


def baselines(data: Dict) -> Dict[str, str]:
    """Per op, the backend its speed-ups are measured against: the first peer of the run (a baseline a user already
    has: nn.Linear, torch AdamW, galore-torch, F.embedding_bag, ...), else weightkit's reference, else (a run of one
    backend, e.g. ``-k cpu``) the op's first backend."""
    out: Dict[str, str] = {}
    ran: Dict[str, List[str]] = {}
    for (op, _), extra, _ in _rows(data):
        name = str(extra.get("backend"))
        ran.setdefault(op, []).append(name)
        if name not in BACKENDS and op not in out:
            out[op] = name
    for op, names in ran.items():
        out.setdefault(op, "reference" if "reference" in names else names[0])
    return out


def table(data: Dict) -> str:
    info = data.get("machine_info", {}).get("weightkit", {})
    copy = _copy_gbps(data)
    header = (f"device: {info.get('device')}; torch {info.get('torch')}; triton {info.get('triton')}; "
              f"weightkit {info.get('version')}; {data.get('datetime', '')[:19]}"
              + (f"; copy bandwidth {copy:.1f} GB/s (read + write, this run)" if copy else ""))
    rows = _rows(data)
    reference = {key: mean for key, extra, mean in rows if extra.get("backend") == "reference"}
    peers: Dict[Tuple[str, str], List[Tuple[str, float]]] = {}
    for key, extra, mean in rows:
        if extra.get("backend") not in BACKENDS:
            peers.setdefault(key, []).append((str(extra.get("backend")), mean))
    lines = [header, "", "| op | backend | shape | mean ms | GB/s | % of copy | TFLOP/s | speed-up vs reference | "
             "speed-up vs peers |", "|---|---|---|---|---|---|---|---|---|"]
    for key, extra, mean in rows:
        ref = reference.get(key)
        ratio = f"{ref / mean:.2f}x" if ref else "-"
        gbs = f"{extra['GB/s']:.2f}" if "GB/s" in extra else "-"
        pct = f"{100 * extra['GB/s'] / copy:.0f}%" if "GB/s" in extra and copy else "-"
        tfs = f"{extra['TFLOP/s']:.3f}" if "TFLOP/s" in extra else "-"
        shape = extra.get("shape", "-")
        vs_peers = "-"
        if extra.get("backend") in BACKENDS and peers.get(key):
            vs_peers = ", ".join(f"{name} {peer / mean:.2f}x" for name, peer in peers[key])
        lines.append(f"| {key[0]} | {extra.get('backend', '-')} | {shape} | {mean * 1e3:.3f} | {gbs} | {pct} | {tfs} | "
                     f"{ratio} | {vs_peers} |")
    return "\n".join(lines)


def speedups(data: Dict) -> Dict[str, Dict]:
    """Per op: {"baseline": name, "shapes": [shape labels in run order], "lines": {backend or peer: [(shape index,
    baseline time / its time, % of copy bandwidth or None)]}}; shapes where the baseline did not run are left out."""
    copy = _copy_gbps(data)
    base_of = baselines(data)
    base_time = {key: mean for key, extra, mean in _rows(data) if str(extra.get("backend")) == base_of[key[0]]}
    out: Dict[str, Dict] = {}
    for key, extra, mean in _rows(data):
        op, shape = key
        if key not in base_time:
            continue
        entry = out.setdefault(op, {"baseline": base_of[op], "shapes": [], "lines": {}})
        if shape not in entry["shapes"]:
            entry["shapes"].append(shape)
        pct = 100 * extra["GB/s"] / copy if "GB/s" in extra and copy else None
        entry["lines"].setdefault(str(extra.get("backend")), []).append(
            (entry["shapes"].index(shape), base_time[key] / mean, pct))
    return out


def plot(data: Dict, path: str) -> Optional[str]:
    """Per op, the speed-up over its baseline (:func:`baselines`) across the sizes of the run, one line per backend
    and peer (the baseline is the line at 1), each point labelled with its share of the copy bandwidth measured in
    the same run where the op moves a known number of bytes."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ops = speedups(data)
    if not ops:
        return None
    cols = min(3, len(ops))
    nrows = (len(ops) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 3.6 * nrows), squeeze=False)
    for ax, (op, entry) in zip(axes.flat, ops.items()):
        for name, pts in entry["lines"].items():
            xs = [p[0] for p in pts]
            ys = [p[1] for p in pts]
            style = dict(color="black", linestyle="--", linewidth=1) if name == entry["baseline"] else dict(marker="o")
            ax.plot(xs, ys, label=name, **style)
            if name != entry["baseline"]:
                for x, y, pct in pts:
                    if pct is not None:
                        ax.annotate(f"{pct:.0f}%", (x, y), textcoords="offset points", xytext=(3, 3), fontsize=6)
        ax.set_yscale("log", base=2)
        ax.set_xticks(range(len(entry["shapes"])), [" x ".join(str(v) for v in json.loads(s)) if s != "null" else "-"
                                                     for s in entry["shapes"]], fontsize=7, rotation=20)
        ax.set_title(f"{op}: speed-up vs {entry['baseline']}", fontsize=8)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(ops):]:
        ax.axis("off")
    info = data.get("machine_info", {}).get("weightkit", {})
    copy = _copy_gbps(data)
    fig.suptitle(f"weightkit on {info.get('device')} (> 1: faster than the baseline; labels: % of the copy bandwidth"
                 + (f" {copy:.0f} GB/s" if copy else "") + ")", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------------------
# The docs' benchmarks page, generated from bench/results/.

DOCS_HEADER = """# Benchmarks

Generated by `python -m weightkit.benchreport --docs docs/benchmarks.md` (`make docs`) from the result files in
`bench/results/`; do not edit by hand. Each table comes from one run, headed by its device, versions and date;
ratios compare figures of the same run. Newest runs first. What the figures mean for each hot path, and the targets,
are in the hot-path pages and the issues.
"""


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e3 else f"{value:,.0f}"
    return str(value)


def gpu_report_table(data: Dict) -> str:
    """A GPU report (bench/gpu_report.py): one table per section, each row's time, rate and ratio to its baseline."""
    meta = data.get("meta", {})
    head = (f"device: {meta.get('device')}; torch {meta.get('torch')}; CUDA {meta.get('cuda')}; triton "
            f"{meta.get('triton')}; weightkit {meta.get('weightkit')}; {meta.get('date')}"
            + (f"; copy bandwidth {data['copy_GBps']:.0f} GB/s (this run)" if data.get("copy_GBps") else ""))
    out = [head]
    sections: Dict[str, List[Dict]] = {}
    for row in data.get("rows", []):
        sections.setdefault(str(row.get("section")), []).append(row)
    for section, rows in sections.items():
        out += ["", f"**{section}**", "", "| what | ms | GB/s | % of copy | TFLOP/s | vs | ratio (> 1: faster) |",
                "|---|---|---|---|---|---|---|"]
        for r in rows:
            out.append(f"| {r.get('name')} | {_fmt(r.get('ms'))} | {_fmt(r.get('GB/s'))} | "
                       f"{_fmt(r.get('pct_copy_bw'), 2)} | {_fmt(r.get('TFLOP/s'))} | {r.get('vs', '-')} | "
                       f"{_fmt(r.get('speedup_vs_base'), 2)} |")
    skipped = data.get("skipped") or []
    if skipped:
        out += ["", f"Skipped in this run ({len(skipped)}): " + "; ".join(str(s) for s in skipped)]
    return "\n".join(out)


def train_table(data: Dict) -> str:
    """A training run (weightkit train's JSON): per method the losses, speed, memory and optimizer state."""
    cfg = data.get("config", {})
    model = data.get("model") or []
    head = "; ".join(model) if model else ", ".join(f"{k} {v}" for k, v in cfg.items() if v is not None)
    devices = sorted({str(r.get("device")) for r in data.get("results", []) if r.get("device")})
    versions = "; ".join(f"{k} {data[k]}" for k in ("torch", "triton", "weightkit", "date") if data.get(k))
    out = [f"{head}" + (f" (device: {', '.join(devices)})" if devices else "") + (f"; {versions}" if versions else ""),
           "",
           "| method | peak lr | final train loss | val loss | tokens/s | peak memory MB | optimizer state MB | error |",
           "|---|---|---|---|---|---|---|---|"]
    for r in data.get("results", []):
        losses = r.get("train_loss") or [None]
        peak = r.get("peak_memory_mb", r.get("peak_rss_mb"))
        state = r.get("optimizer_state_bytes")
        out.append(f"| {r.get('method')} | {_fmt(r.get('lr', cfg.get('lr')))} | {_fmt(losses[-1], 4)} | "
                   f"{_fmt(r.get('val_loss'), 4)} | {_fmt(r.get('tokens_per_s'), 4)} | {_fmt(peak, 4)} | "
                   f"{_fmt(state / 1e6 if state else None, 4)} | {r.get('error') or '-'} |")
    return "\n".join(out)


def _run_date(path: str, data: Dict) -> str:
    import re

    if data.get("datetime"):
        return str(data["datetime"])[:19]
    if data.get("meta", {}).get("date"):
        return str(data["meta"]["date"])
    found = re.search(r"\d{4}-\d{2}-\d{2}", path)
    return found.group(0) if found else ""


def docs_page(results_dir: str) -> str:
    """The benchmarks page: every JSON result file of ``results_dir``, newest first (ties by name)."""
    import glob
    import os

    entries = []
    for path in glob.glob(os.path.join(results_dir, "*.json")):
        data = load(path)
        name = os.path.basename(path)
        if "benchmarks" in data:
            body = table(data)
        elif "meta" in data and "rows" in data:
            body = gpu_report_table(data)
        elif "results" in data and "config" in data:
            body = train_table(data)
        else:
            continue  # other records (e.g. fuzzing counts) are not benchmark tables
        entries.append((_run_date(name, data), name, body))
    entries.sort(key=lambda e: (e[0], e[1]), reverse=True)
    parts = [DOCS_HEADER]
    for date, name, body in entries:
        parts.append(f"## `{name}`\n\n{body}\n")
    return "\n".join(parts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("json", nargs="?")
    parser.add_argument("--png", default=None)
    parser.add_argument("--docs", default=None, help="write the docs' benchmarks page (from --results) to this file")
    parser.add_argument("--results", default="bench/results", help="the result folder for --docs")
    args = parser.parse_args(argv)
    if args.docs:
        with open(args.docs, "w", encoding="utf-8") as f:
            f.write(docs_page(args.results))
        print(f"wrote {args.docs}")
        return 0
    if not args.json:
        parser.error("give a result JSON file, or --docs PAGE")
    data = load(args.json)
    print(table(data))
    if args.png and plot(data, args.png):
        print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
