"""Layering: ``passes/`` holds passes only, and a pass never reaches into another pass module.

What one pass needs of another's work travels on the context; what several passes share (decode graphs, the
autodiff, the weight view) lives in a ``bq_onnx`` module named for it. Parsed, not imported, so a violation is
reported even where importing would fail.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PASSES = Path(__file__).resolve().parent.parent / "passes"
PACKAGE = "bq_onnx.passes"


def _pass_imports(path: Path) -> list[str]:
    """Every ``bq_onnx.passes`` module that ``path`` imports, at any depth of the file (lazy imports count)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name == PACKAGE or a.name.startswith(PACKAGE + ".")]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 1:  # relative to passes/: from . import x, from .x import y
                base = node.module or ""
                found += [f"{PACKAGE}.{base or a.name}" for a in node.names]
            elif node.level:
                continue  # relative beyond passes/: not a pass module
            elif node.module == PACKAGE:
                found += [f"{PACKAGE}.{a.name}" for a in node.names]
            elif node.module and node.module.startswith(PACKAGE + "."):
                found.append(node.module)
    return found


MODULES = sorted(p for p in PASSES.glob("*.py") if p.name != "__init__.py")


def test_passes_directory_is_found():
    assert len(MODULES) >= 6, f"expected the pass modules under {PASSES}"


@pytest.mark.parametrize("path", MODULES, ids=[p.stem for p in MODULES])
def test_no_pass_module_imports_another(path: Path):
    own = f"{PACKAGE}.{path.stem}"
    others = sorted({m for m in _pass_imports(path) if m != own})
    assert not others, f"passes/{path.name} imports {others}: move what it needs out of passes/"


def test_the_check_sees_every_import_form(tmp_path: Path):
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import bq_onnx.passes.quantize\n"
        "from bq_onnx.passes import loss\n"
        "from bq_onnx.passes.tables import X\n"
        "from .rewrite import Y\n"
        "def f():\n    from bq_onnx.passes.autodiff import Z\n"
        "import bq_onnx.passesque\n"
        "from bq_onnx.decode.ops import W\n"
    )
    assert _pass_imports(sample) == [
        "bq_onnx.passes.quantize", "bq_onnx.passes.loss", "bq_onnx.passes.tables", "bq_onnx.passes.rewrite",
        "bq_onnx.passes.autodiff",
    ]
