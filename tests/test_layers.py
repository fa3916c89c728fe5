"""The packages form layers (data < retrieval < ranking < pipeline < benchmarks): no module imports from a
package above its own, lazily inside a function included."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ORDER = ["data", "retrieval", "ranking", "pipeline", "benchmarks"]


def upward_imports() -> list[str]:
    found = []
    for level, package in enumerate(ORDER):
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top in ORDER and ORDER.index(top) > level:
                        found.append(f"{path.relative_to(ROOT)}:{node.lineno} -> {name}")
    return found


def test_no_package_imports_from_a_higher_one():
    assert upward_imports() == []


def test_the_scan_sees_an_upward_import(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "bad.py").write_text("def f():\n    from pipeline.train import load_dataset\n")
    for package in ORDER[1:]:
        (tmp_path / package).mkdir()
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert upward_imports() == ["data/bad.py:2 -> pipeline.train"]
