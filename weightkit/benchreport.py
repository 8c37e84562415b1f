"""Tables and plots from pytest-benchmark JSON files written by the bench/ suites.

``python -m weightkit.benchreport FILE.json [--png OUT.png]`` prints a markdown table: op, backend, shape, mean
time, GB/s or TFLOP/s, the speed-up against the reference backend, and against every peer of the same op and
shape in the same run (a peer is an entry whose ``backend`` is not a weightkit backend: nn.Linear, torch AdamW,
galore-torch, ...; ratios above 1 mean weightkit is faster).
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


def table(data: Dict) -> str:
    info = data.get("machine_info", {}).get("weightkit", {})
    header = (f"device: {info.get('device')}; torch {info.get('torch')}; triton {info.get('triton')}; "
              f"weightkit {info.get('version')}; {data.get('datetime', '')[:19]}")
    rows = _rows(data)
    reference = {key: mean for key, extra, mean in rows if extra.get("backend") == "reference"}
    peers: Dict[Tuple[str, str], List[Tuple[str, float]]] = {}
    for key, extra, mean in rows:
        if extra.get("backend") not in BACKENDS:
            peers.setdefault(key, []).append((str(extra.get("backend")), mean))
    lines = [header, "", "| op | backend | shape | mean ms | GB/s | TFLOP/s | speed-up vs reference | speed-up vs peers |",
             "|---|---|---|---|---|---|---|---|"]
    for key, extra, mean in rows:
        ref = reference.get(key)
        ratio = f"{ref / mean:.2f}x" if ref else "-"
        gbs = f"{extra['GB/s']:.2f}" if "GB/s" in extra else "-"
        tfs = f"{extra['TFLOP/s']:.3f}" if "TFLOP/s" in extra else "-"
        shape = extra.get("shape", "-")
        vs_peers = "-"
        if extra.get("backend") in BACKENDS and peers.get(key):
            vs_peers = ", ".join(f"{name} {peer / mean:.2f}x" for name, peer in peers[key])
        lines.append(f"| {key[0]} | {extra.get('backend', '-')} | {shape} | {mean * 1e3:.3f} | {gbs} | {tfs} | {ratio} | {vs_peers} |")
    return "\n".join(lines)


def plot(data: Dict, path: str) -> Optional[str]:
    """Horizontal bars of mean time per (op, shape, backend), log scale."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = _rows(data)
    if not rows:
        return None
    labels = [f"{k[0]} {e.get('shape', '')} [{e.get('backend', '-')}]" for k, e, _ in rows]
    times = [m * 1e3 for _, _, m in rows]
    fig, ax = plt.subplots(figsize=(9, max(2.5, 0.28 * len(rows) + 1)))
    ax.barh(range(len(rows)), times, color="tab:blue")
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("mean time (ms, log scale)")
    info = data.get("machine_info", {}).get("weightkit", {})
    ax.set_title(f"weightkit benchmarks on {info.get('device')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("json")
    parser.add_argument("--png", default=None)
    args = parser.parse_args(argv)
    data = load(args.json)
    print(table(data))
    if args.png and plot(data, args.png):
        print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
