"""A fresh clone passes its own tests: nothing in the tests or the product reads outside the
repository (only ``benchmarks/`` may read the datasets kept beside it)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECKED = ["tests", "orchestrator", "planners", "instruments", "simulators", "examples"]
TEXT = {".py", ".yaml", ".yml", ".md", ".toml", ".txt", ".cfg", ".ini", ".json", ".sh", ".csv"}
SIBLING = "shared"
OUTSIDE = re.compile(
    r"\.\./" + SIBLING                                   # the parent folder's sibling, by relative path
    + r"|" + SIBLING + r"/datasets"                      # its datasets folder
    + r"|/\s*['\"]" + SIBLING + r"['\"]"                 # parent / "<sibling>"
    + r"|['\"]" + SIBLING + r"['\"]\s*/"                 # "<sibling>" / "datasets"
    + r"|join\([^)]*['\"]" + SIBLING + r"['\"]"          # os.path.join(..., "<sibling>")
    + r"|" + SIBLING.upper() + r"_DATASETS"              # the old test constant
)


def _files() -> list[Path]:
    out = []
    for top in CHECKED:
        for p in sorted((ROOT / top).rglob("*")):
            if p.is_file() and p.suffix in TEXT and "__pycache__" not in p.parts \
                    and p != Path(__file__).resolve():  # this file spells out what it looks for
                out.append(p)
    return out


def test_no_test_or_product_file_reads_a_sibling_shared_folder():
    hits = []
    for p in _files():
        for number, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if OUTSIDE.search(line):
                hits.append(f"{p.relative_to(ROOT)}:{number}: {line.strip()[:100]}")

    assert not hits, ("these read outside the repository; use the tables bundled under "
                      "simulators/data/ instead:\n" + "\n".join(hits))


@pytest.mark.parametrize("line", [  # spelt from SIBLING, so this file holds no such path itself
    f'{SIBLING.upper()} = ROOT.parent / "{SIBLING}" / "datasets"',
    f"dataset: ../{SIBLING}/datasets/suzuki",
    f"os.path.join(here, '..', '{SIBLING}', 'datasets')",
    f"see {SIBLING}/datasets/README.md",
])
def test_the_check_catches_each_way_of_reaching_the_sibling_folder(line):
    assert OUTSIDE.search(line)


def test_every_bundled_table_is_package_data_and_cited():
    import tomllib

    data = ROOT / "simulators" / "data"
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    readme = (data / "README.md").read_text()
    tables = sorted(p for p in data.iterdir() if p.is_dir())
    assert tables
    for t in tables:
        for f in ("data.csv", "dataset.yaml"):
            rel = (t / f).relative_to(ROOT / "simulators")
            assert any(rel.match(pat) for pat in patterns["simulators"]), f"{rel} is not package data"
        assert f"`{t.name}/`" in readme, f"{t.name} is not cited in simulators/data/README.md"
