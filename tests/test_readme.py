"""The docs' Backends table (docs/backends.md, linked from the README) says, per op, which backends exist and in which order ``auto`` tries them on CUDA
tensors: both are read from the code (each op's KernelTable), so the table cannot drift from it."""

import os
import re

from weightkit import backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
BACKENDS_PAGE = os.path.join(ROOT, "docs", "backends.md")


def backends_table():
    """{op name: (has reference, cpu, cuda, triton), auto order} from the '## Backends' table of docs/backends.md."""
    text = open(BACKENDS_PAGE, encoding="utf-8").read()
    section = text.split("\n## Backends\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 6 or not cells[0].startswith("`"):
            continue
        for name in re.findall(r"`([a-z0-9_]+)`", cells[0].split("(")[0]):
            rows[name] = (tuple(c == "yes" for c in cells[1:5]), tuple(cells[5].split(", then ")))
    return rows


def test_backends_table_matches_the_kernel_tables():
    rows = backends_table()
    tables = {t.name: t for t in backend._TABLES}
    assert len(tables) >= 11 and set(rows) == set(tables), (sorted(rows), sorted(tables))
    for name, (present, order) in rows.items():
        t = tables[name]
        assert present == tuple(b in t.impls for b in ("reference", "cpu", "cuda", "triton")), name
        assert order == t.cuda_order, f"{name}: docs/backends.md says {order}, the code tries {t.cuda_order}"


def test_readme_quick_starts_run():
    """Every self-contained Python quick start of the README (a block that starts with ``import torch``) runs as
    written; the others are fragments of a complete, tested example in docs/."""
    text = open(README, encoding="utf-8").read()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if b.startswith("import torch")]
    assert len(blocks) >= 3, "the swap, GaLore and Q-GaLore quick starts"
    for i, code in enumerate(blocks):
        exec(compile(code, f"README.md python block {i}", "exec"), {})  # noqa: S102 - the README's own example


def test_readme_links_resolve():
    text = open(README, encoding="utf-8").read()
    links = re.findall(r"\]\(([^)#]+)\)", text)
    assert links
    missing = [p for p in links if not p.startswith("http") and not os.path.exists(os.path.join(ROOT, p))]
    assert not missing, missing
