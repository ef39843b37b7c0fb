"""Project rules that code review would otherwise have to catch."""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _python_files() -> list[Path]:
    """The project's .py files, committed or not, but none that .gitignore keeps out (a developer's
    ad hoc scripts in runs/, virtual environments); outside a git work tree, every .py file."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.py"], cwd=REPO,
                            capture_output=True, text=True)
    if listed.returncode != 0:
        return [p for p in REPO.rglob("*.py") if ".git" not in p.parts and "venv" not in str(p)]
    return [REPO / name for name in listed.stdout.splitlines() if (REPO / name).is_file()]


PY_FILES = _python_files()


def test_torch_load_is_always_weights_only():
    offenders = []
    for path in PY_FILES:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                safe = any(k.arg == "weights_only" and ast.unparse(k.value) == "True" for k in node.keywords)
                if not safe:
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert offenders == []


def test_inference_package_never_imports_training_or_benchmarks():
    pattern = re.compile(r"^\s*(from|import)\s+(training|benchmarks)\b", re.MULTILINE)
    offenders = [p.name for p in (REPO / "midol_hub").rglob("*.py") if pattern.search(p.read_text())]
    assert offenders == []


def test_training_never_imports_benchmarks():
    pattern = re.compile(r"^\s*(from|import)\s+benchmarks\b", re.MULTILINE)
    offenders = [p.name for p in (REPO / "training").rglob("*.py") if pattern.search(p.read_text())]
    assert (REPO / "training" / "prepare_shared_data.py").is_file()  # the folder is really read
    assert offenders == []


def test_examples_use_only_the_public_api():
    import midol_hub

    for path in (REPO / "examples").glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("midol_hub"):
                assert node.module == "midol_hub", f"{path.name} imports {node.module}"
                assert all(alias.name in midol_hub.__all__ for alias in node.names), path.name


def _internal_imports(path: Path) -> set[str]:
    """Modules of midol_hub that ``path`` imports, at top level or inside functions
    (imports under ``if TYPE_CHECKING:`` do not run and are left out)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING"
               for n in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped or not isinstance(node, ast.ImportFrom):
            continue
        if node.level == 1 and node.module:
            found.add(node.module.split(".")[0])
        elif node.level == 1:
            found.update(alias.name for alias in node.names)
        elif node.module and node.module.startswith("midol_hub."):
            found.add(node.module.split(".")[1])
    return found


def test_no_import_cycle_inside_midol_hub():
    modules = {p.stem: p for p in (REPO / "midol_hub").glob("*.py") if p.stem != "__init__"}
    graph = {name: _internal_imports(path) & set(modules) for name, path in modules.items()}
    assert graph["encoding"] and "loading" not in graph["encoding"]  # the graph is really read

    def cycle_from(start: str, node: str, trail: list[str]) -> list[str] | None:
        for nxt in sorted(graph[node]):
            if nxt == start:
                return trail + [nxt]
            if nxt not in trail:
                found = cycle_from(start, nxt, trail + [nxt])
                if found:
                    return found
        return None

    cycles = [" -> ".join([name, *cycle]) for name in sorted(graph) if (cycle := cycle_from(name, name, []))]
    assert cycles == []
    # what encode uses of the calibration is a leaf; fitting it sits above encode
    assert graph["detection"] <= {"configuration_midol", "modalities"}
    assert "calibration" not in graph["encoding"] and "modeling_midol" in graph["calibration"]


def test_the_data_layout_lives_in_one_module():
    """Only training/shared_data.py names the folders of $MIDOL_DATA (tests may read files)."""
    folders = re.compile(r"pneumoniamnist_balanced_subset|kermany_oct2017|isic_uda1_|idrid_segmentation|bloodmnist/")
    naming = [p for p in PY_FILES if folders.search(p.read_text(encoding="utf-8"))]
    assert REPO / "training" / "shared_data.py" in naming  # the listing reads the project and the pattern matches
    offenders = [str(p.relative_to(REPO)) for p in naming
                 if p.parts[len(REPO.parts)] not in ("tests",) and p.name != "shared_data.py"]
    assert offenders == []
