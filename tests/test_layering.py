"""Imports flow one way (cli -> orchestrate -> stages -> objectives -> engine/models/data/eval -> config -> errors):
this test parses every module's imports, those inside functions included, and fails on one that runs back up."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
UPPER = ("pipeline.stages", "pipeline.orchestrate", "pipeline.cli")
# package (or module) -> the modules it must not import from
FORBIDDEN = {
    "pipeline.errors": ("pipeline", "shards"),
    "pipeline.models": UPPER + ("pipeline.engine", "pipeline.data", "pipeline.eval", "pipeline.objectives",
                                "pipeline.cluster"),
    "pipeline.engine": UPPER + ("pipeline.models", "pipeline.eval", "pipeline.objectives"),
    "pipeline.data": UPPER + ("pipeline.models", "pipeline.eval", "pipeline.objectives", "pipeline.engine"),
    "pipeline.eval": UPPER + ("pipeline.engine", "pipeline.objectives"),
    "pipeline.losses": UPPER + ("pipeline.models", "pipeline.objectives"),
    "pipeline.objectives": UPPER,
    "pipeline.stages": ("pipeline.orchestrate", "pipeline.cli"),
    "pipeline.cluster": UPPER + ("shards",),
    "shards": UPPER + ("pipeline.config",),
}


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import statement in `path`, absolute names only (the package uses no relative ones)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.append((node.lineno, node.module))
    return found


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def upward_imports() -> list[str]:
    """Returns 'file:line: a imports b' for every import against the layers."""
    found = []
    for path in sorted(list((ROOT / "pipeline").rglob("*.py")) + list((ROOT / "shards").rglob("*.py"))):
        name = module_name(path)
        rules = [bad for owner, bad in FORBIDDEN.items() if within(name, owner)]
        for line, target in imported_modules(path):
            if any(within(target, bad) for forbidden in rules for bad in forbidden):
                found.append(f"{path.relative_to(ROOT)}:{line}: {name} imports {target}")
    return found


def test_no_import_runs_back_up_the_layers():
    assert upward_imports() == []


def test_the_check_sees_an_upward_import(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from pipeline.stages.align import train_align\n")
    assert imported_modules(module) == [(2, "pipeline.stages.align")]
