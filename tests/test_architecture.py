"""The import rule of docs/architecture.md, read from the source with `ast`:

1. a stage never imports another stage (``stages/demo.py`` and ``stages/compare.py`` chain them:
   :data:`ORCHESTRATORS`, each with its reason);
2. the library (``core``, ``data``, ``training``, ``evaluation``) and the shared modules (the
   top-level modules, ``configs``, ``recipes``) never import ``stages`` or ``cli``;
3. inside the library, ``core`` imports none of ``data``, ``training``, ``evaluation``; ``data``
   imports neither ``training`` nor ``evaluation``; ``training`` and ``evaluation`` do not import
   each other; inside ``evaluation``, ``data`` imports neither ``tasks`` nor ``reports``, and
   ``tasks`` does not import ``reports``;
4. the shared modules never import the library: they are the floor every layer stands on;
5. no import cycle anywhere in the package;
6. only the CLI imports the package's own modules inside functions (so that ``--help`` loads no
   torch); everywhere else a module's dependencies are at its top, where they can be seen;
7. the configs import nothing heavy (only the standard library and the shared modules);
8. no module is longer than :data:`MAX_LINES`: past that a module holds two jobs, to be split.

Every import counts, also those inside functions and under TYPE_CHECKING.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "protoclip_cli"
LIBRARY = ("core", "data", "training", "evaluation")
MAX_LINES = 450  # rule 8
# What each library package may not import (rule 3).
BELOW = {
    "core": ("data", "training", "evaluation"),
    "data": ("training", "evaluation"),
    "training": ("evaluation",),
    "evaluation": ("training",),
}
# What each room of evaluation/ may not import (rule 3): data is read by the tasks, whose results
# the reports write.
EVALUATION_BELOW = {"data": ("tasks", "reports"), "tasks": ("reports",)}
# Known exceptions, each with its reason: (importing module, imported module) -> why.
EXCEPTIONS: dict[tuple[str, str], str] = {}
# Stages whose purpose is to chain other stages (rule 1 does not apply to them), each with its reason.
ORCHESTRATORS: dict[str, str] = {
    "demo": "runs download, teacher-embed, train and evaluate on the embedded data set in one command",
    "compare": "trains and evaluates every (variant, seed) of a comparison through the train and evaluate "
    "stages, so its runs are ordinary runs that the stand-alone commands reuse and resume",
}


def module_name(package: Path, path: Path) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(package: Path, path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) for every import in ``path``; ``from pkg import name`` counts as the
    module ``pkg.name`` when that is a module of the package."""
    here = module_name(package, path)
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = here.split(".")[: len(here.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join(parent + ([base] if base else []))
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                relative = Path(*candidate.split(".")[1:])
                is_module = (package / relative).with_suffix(".py").is_file() or (package / relative).is_dir()
                found.append((node.lineno, candidate if is_module else base))
    return found


def function_level_imports(package: Path, path: Path) -> list[tuple[int, str]]:
    """(line, module) of the imports of the package's own modules made inside a function of ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for inner in ast.walk(node):
                if isinstance(inner, ast.ImportFrom) and (inner.level or (inner.module or "").split(".")[0] == package.name):
                    found.append((inner.lineno, inner.module or "."))
                elif isinstance(inner, ast.Import):
                    found += [(inner.lineno, a.name) for a in inner.names if a.name.split(".")[0] == package.name]
    return found


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (a package's own __init__ aside)."""
    modules = {module_name(package, path): path for path in package.rglob("*.py")}
    graph = {}
    for module, path in modules.items():
        targets = {imported for _, imported in imports(package, path)}
        graph[module] = {t for t in targets if t in modules and t != module and not module.startswith(t + ".")}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def layer(module: str) -> tuple[str, str]:
    """(kind, name): ("stage", "train"), ("cli", ...), ("library", "core"), ("shared", "runs"), ..."""
    parts = module.split(".")
    if len(parts) == 1:
        return "shared", ""
    if parts[1] == "stages":
        return "stage", parts[2] if len(parts) > 2 else ""
    if parts[1] in ("cli", "__main__"):
        return "cli", parts[1]
    if parts[1] in LIBRARY:
        return "library", parts[1]
    return "shared", parts[1]


def evaluation_room(module: str) -> str:
    """``data``, ``tasks`` or ``reports`` for a module of evaluation/ ('' for others)."""
    parts = module.split(".")
    return parts[2] if len(parts) > 2 and parts[1] == "evaluation" else ""


def violations(package: Path = PACKAGE) -> list[str]:
    name = package.name
    found = []
    for path in sorted(package.rglob("*.py")):
        module = module_name(package, path)
        kind, part = layer(module)
        for line, imported in imports(package, path):
            if imported != name and not imported.startswith(name + "."):
                continue
            other_kind, other_part = layer(imported)
            rule = None
            if kind == "stage" and other_kind == "stage" and other_part and part != other_part and part not in ORCHESTRATORS:
                rule = "a stage never imports another stage"
            elif kind in ("library", "shared") and other_kind in ("stage", "cli"):
                rule = "the library and shared modules never import stages or the CLI"
            elif kind == "library" and other_kind == "library" and other_part in BELOW[part]:
                rule = f"{part}/ never imports {other_part}/"
            elif evaluation_room(imported) in EVALUATION_BELOW.get(evaluation_room(module), ()):
                rule = f"evaluation/{evaluation_room(module)}/ never imports evaluation/{evaluation_room(imported)}/"
            elif kind == "shared" and other_kind == "library":
                rule = "shared modules never import the library"
            if rule and (module, imported) not in EXCEPTIONS:
                found.append(f"{path.relative_to(package.parent)}:{line}: {module} imports {imported} ({rule})")
    return found


def test_the_package_keeps_the_import_rule():
    found = violations()
    assert not found, "\n".join(found)


def test_no_import_cycle_anywhere_in_the_package():
    found = cycles(import_graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_no_module_is_longer_than_the_limit():
    found = [f"{path.relative_to(PACKAGE.parent)}: {lines} lines"
             for path in sorted(PACKAGE.rglob("*.py")) if (lines := len(path.read_text().splitlines())) > MAX_LINES]
    assert not found, f"modules over {MAX_LINES} lines (split them by job):\n" + "\n".join(found)


def test_only_the_cli_imports_the_package_inside_functions():
    found = [f"{path.relative_to(PACKAGE.parent)}:{line}: {module}"
             for path in sorted(PACKAGE.rglob("*.py")) if path.relative_to(PACKAGE).parts[0] != "cli"
             for line, module in function_level_imports(PACKAGE, path)]
    assert not found, "imports of the package inside functions (move them to the module's top):\n" + "\n".join(found)


def test_configs_import_only_the_standard_library_and_shared_modules():
    import sys

    allowed = set(sys.stdlib_module_names) | {PACKAGE.name}
    found = [f"{path.name}:{line}: {module}" for path in sorted((PACKAGE / "configs").glob("*.py"))
             for line, module in imports(PACKAGE, path) if module.split(".")[0] not in allowed]
    assert not found, "\n".join(found)


def test_the_cycle_check_finds_a_cycle_through_a_function_level_import(tmp_path):
    package = tmp_path / "protoclip_cli"
    files = {"__init__.py": "", "a.py": "from protoclip_cli import b\n", "b.py": "def f():\n    from protoclip_cli import c\n",
             "c.py": "import protoclip_cli.a\n", "d.py": "from protoclip_cli import a\n"}
    for relative, text in files.items():
        (package / relative).parent.mkdir(parents=True, exist_ok=True)
        (package / relative).write_text(text)
    assert cycles(import_graph(package)) == [["protoclip_cli.a", "protoclip_cli.b", "protoclip_cli.c"]]
    assert function_level_imports(package, package / "b.py") == [(2, "protoclip_cli")]


def test_the_rule_catches_each_kind_of_violation(tmp_path):
    """The checker itself: a fake package with one import of each forbidden kind."""
    package = tmp_path / "protoclip_cli"
    files = {
        "__init__.py": "",
        "runs.py": "def f():\n    from protoclip_cli.cli import main\n",
        "stages/__init__.py": "",
        "stages/train.py": "from protoclip_cli.stages import teacher_embed\n",
        "stages/teacher_embed.py": "from . import download\n",
        "stages/download.py": "",
        "stages/demo.py": "from protoclip_cli.stages import download, train\n",
        "core/__init__.py": "",
        "core/model.py": "from ..data import shards\n",
        "data/__init__.py": "",
        "data/shards.py": "import protoclip_cli.stages.download\n",
        "training/__init__.py": "",
        "training/loop.py": "from protoclip_cli.evaluation.models import x\nfrom protoclip_cli.data.shards import y\n",
        "evaluation/__init__.py": "",
        "evaluation/models.py": "from protoclip_cli.runs import RunDir\n",
        "evaluation/data/readers.py": "from protoclip_cli.evaluation.tasks.model import x\n",
        "evaluation/tasks/model.py": "from protoclip_cli.evaluation.data import readers\n",
        "evaluation/tasks/zeroshot.py": "from protoclip_cli.evaluation.reports import plots\n",
        "evaluation/reports/records.py": "from protoclip_cli.evaluation.tasks import model\n",
        "workspace.py": "from protoclip_cli.core import model\n",
    }
    for relative, text in files.items():
        (package / relative).parent.mkdir(parents=True, exist_ok=True)
        (package / relative).write_text(text)
    found = violations(package)
    assert found == [
        "protoclip_cli/core/model.py:1: protoclip_cli.core.model imports protoclip_cli.data.shards (core/ never imports data/)",
        "protoclip_cli/data/shards.py:1: protoclip_cli.data.shards imports protoclip_cli.stages.download "
        "(the library and shared modules never import stages or the CLI)",
        "protoclip_cli/evaluation/data/readers.py:1: protoclip_cli.evaluation.data.readers imports "
        "protoclip_cli.evaluation.tasks.model (evaluation/data/ never imports evaluation/tasks/)",
        "protoclip_cli/evaluation/tasks/zeroshot.py:1: protoclip_cli.evaluation.tasks.zeroshot imports "
        "protoclip_cli.evaluation.reports (evaluation/tasks/ never imports evaluation/reports/)",
        "protoclip_cli/runs.py:2: protoclip_cli.runs imports protoclip_cli.cli "
        "(the library and shared modules never import stages or the CLI)",
        "protoclip_cli/stages/teacher_embed.py:1: protoclip_cli.stages.teacher_embed imports "
        "protoclip_cli.stages.download (a stage never imports another stage)",
        "protoclip_cli/stages/train.py:1: protoclip_cli.stages.train imports protoclip_cli.stages.teacher_embed "
        "(a stage never imports another stage)",
        "protoclip_cli/training/loop.py:1: protoclip_cli.training.loop imports protoclip_cli.evaluation.models "
        "(training/ never imports evaluation/)",
        "protoclip_cli/workspace.py:1: protoclip_cli.workspace imports protoclip_cli.core.model "
        "(shared modules never import the library)",
    ]
