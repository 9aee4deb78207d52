"""The package's shape, checked from its source: one megatron-core seam, imports that point down the
pipeline, and functions short enough to read.

Floors, bottom to top (a module may import its own package and the floors below it, never a
sibling on its own floor or anything above):

    0  errors, io, resources, typed_config   (modules at the package root)
    1  runtime/      process setup, CPU layer, layouts          \\
    2  models/       configs, builder, checkpoints, GPT ops      > the megatron-core seam
    3  training/     DDP, optimizer, schedule, optimizer state  /
    4  alignment/ (SAMI objective, step, trainer)   conversion/ (HF <-> Megatron)
    5  rollout/      constitutions, queries, generation, filters, principles
    6  evaluation/ (MI, win rates, judge)   serving/ (OpenAI-compatible server)
    7  iteration/    the expert-iteration driver and its report
    8  cli/   testing/
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "megatron_sami"
SEAM = ("runtime", "models", "training")
FLOORS = {"runtime": 1, "models": 2, "training": 3, "alignment": 4, "conversion": 4, "rollout": 5,
          "evaluation": 6, "serving": 6, "iteration": 7, "cli": 8, "testing": 8}
MAX_FUNCTION_LINES = 60


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _package_of(path: Path) -> str | None:
    """The subpackage a module belongs to, or None for a module at the package root."""
    parts = path.relative_to(PACKAGE).parts
    return parts[0] if len(parts) > 1 else None


def _imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, dotted name) of every import in the module, at any depth (lazy imports count)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            # ``from megatron_sami import rollout`` names a package through its alias
            if node.module == "megatron_sami":
                found.extend((node.lineno, f"megatron_sami.{alias.name}") for alias in node.names)
    return found


def test_only_the_seam_imports_megatron_core():
    offenders = []
    for path in _modules():
        if _package_of(path) in SEAM:
            continue
        for line, name in _imported_modules(path):
            if name == "megatron" or name.startswith("megatron."):
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {name}")
        for number, text in enumerate(path.read_text().splitlines(), 1):
            if "megatron.core" in text:
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{number} names megatron.core")
    assert not offenders, "only runtime/, models/ and training/ may use megatron-core:\n" + "\n".join(offenders)


def test_imports_point_down_the_pipeline():
    offenders = []
    for path in _modules():
        if path == PACKAGE / "__init__.py":
            continue  # the package's entry installs runtime.megatron_import's finder before anything else
        package = _package_of(path)
        floor = FLOORS.get(package, 0)
        for line, name in _imported_modules(path):
            parts = name.split(".")
            if parts[0] != "megatron_sami" or len(parts) < 2:
                continue
            target = parts[1] if parts[1] in FLOORS else None
            if target == package:
                continue
            target_floor = FLOORS.get(target, 0)
            if target_floor >= floor and not (target is None and floor == 0):
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({package or 'root'}, floor {floor}) "
                                 f"imports {name} (floor {target_floor})")
    assert not offenders, "imports must point to a lower floor (see this module's docstring):\n" + "\n".join(offenders)


def test_every_subpackage_is_on_a_floor():
    packages = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert packages == set(FLOORS), f"add new subpackages to FLOORS: {sorted(packages ^ set(FLOORS))}"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_function_exceeds_sixty_lines(path):
    long = [f"{node.name} (line {node.lineno}): {node.end_lineno - node.lineno + 1} lines"
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"split these functions (at most {MAX_FUNCTION_LINES} lines each): {long}"


def test_the_checks_can_fail(tmp_path):
    """The scanners see what they look for (a lazy import inside a function, a long function)."""
    sample = tmp_path / "sample.py"
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    sample.write_text(f"def f():\n    from megatron.core import parallel_state\n{body}\n")
    assert (2, "megatron.core") in _imported_modules(sample)
    tree = ast.parse(sample.read_text())
    assert tree.body[0].end_lineno - tree.body[0].lineno + 1 > MAX_FUNCTION_LINES
