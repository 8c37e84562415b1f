"""Print a markdown table (op, backend, shape, mean time, GB/s or TFLOP/s, ratio to reference) from a
pytest-benchmark JSON file."""

import json
import sys
from collections import defaultdict


def main(path: str) -> None:
    with open(path) as f:
        data = json.load(f)
    info = data["machine_info"].get("weightkit", {})
    print(f"device: {info.get('device')}  torch {info.get('torch')}  triton {info.get('triton')}  ({data['datetime']})")
    rows = []
    reference = {}
    for b in data["benchmarks"]:
        extra = b.get("extra_info", {})
        key = (extra.get("op", b["group"] or b["name"].split("[")[0]), json.dumps(extra.get("shape")))
        mean = b["stats"]["mean"]
        if extra.get("backend") == "reference":
            reference[key] = mean
        rows.append((key, extra, mean))
    print("| op | backend | shape | mean ms | GB/s | TFLOP/s | speed-up vs reference |")
    print("|---|---|---|---|---|---|---|")
    for key, extra, mean in rows:
        ref = reference.get(key)
        ratio = f"{ref / mean:.1f}x" if ref else "-"
        gbs = f"{extra['GB/s']:.2f}" if "GB/s" in extra else "-"
        tfs = f"{extra['TFLOP/s']:.2f}" if "TFLOP/s" in extra else "-"
        print(f"| {key[0]} | {extra.get('backend', '-')} | {extra.get('shape', '-')} | {mean * 1e3:.3f} | {gbs} | {tfs} | {ratio} |")


if __name__ == "__main__":
    main(sys.argv[1])
