"""core/ is the ML library: it never imports the app, the UI or the database layer."""
from __future__ import annotations

import ast
from pathlib import Path

CORE = Path(__file__).resolve().parents[1] / "core"
FORBIDDEN = ("stego_app", "gradio", "sqlalchemy", "alembic")


def test_core_imports_no_app_ui_or_database_module():
    offenders = []
    for path in sorted(CORE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.name}:{node.lineno} imports {n}" for n in names
                          if n.split(".")[0] in FORBIDDEN]
    assert not offenders, offenders
    assert len(list(CORE.glob("*.py"))) > 20          # the scan did look at core/
