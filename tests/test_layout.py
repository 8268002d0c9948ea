"""The shape of the code: stages hand each other files (pipeline.artifacts), never imports."""

from __future__ import annotations

import ast

from tests.conftest import REPO

STAGES = {"fetch", "prepare", "train", "evaluate", "report", "predict"}


def pipeline_imports(path) -> set[str]:
    """The top-level ``pipeline.<module>`` names a file imports."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "pipeline":
                found |= {alias.name for alias in node.names}
            elif node.module.startswith("pipeline."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("pipeline.")}
    return found


def test_no_module_imports_a_stage_but_the_stage_itself():
    modules = sorted((REPO / "pipeline").rglob("*.py"))
    assert len(modules) > 10
    offenders = {}
    for path in modules:
        own = path.stem if path.parent == REPO / "pipeline" else None
        stages = pipeline_imports(path) & (STAGES - {own})
        if stages:
            offenders[str(path.relative_to(REPO))] = sorted(stages)
    assert offenders == {}, f"modules that import a stage: {offenders}"
