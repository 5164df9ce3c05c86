"""The package's layering is what the Layout section says (README.md's "## Layout", the one place
the modules are listed; LAYOUT_PAGE names it): every module is listed there, and each imports (at
module level or inside a function) only modules listed before it, so there are no cycles and the
leaves import nothing of ours. Imports under ``if TYPE_CHECKING:`` serve string annotations only
(they never run), so a module may name a later module's types there. No module grows much past 400 lines."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "dist_finetune"
LAYOUT_PAGE = ROOT / "README.md"
MAX_LINES = 420


def documented_order() -> list[str]:
    section = LAYOUT_PAGE.read_text().split("## Layout", 1)[1].split("\n## ", 1)[0]
    listing = section.split("`launch_configs/`", 1)[0]
    return [name[:-3] for name in re.findall(r"`(\w+\.py)`", listing)]


def _runtime_nodes(tree: ast.AST):
    """Every node of ``tree`` except those under ``if TYPE_CHECKING:`` (imported for annotations only)."""
    pending = [tree]
    while pending:
        node = pending.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and ast.unparse(child.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
                pending.extend(child.orelse)
            else:
                pending.append(child)


def our_imports(path: Path) -> set[str]:
    """Modules of the package that ``path`` imports when it runs, wherever the import statement stands."""
    found = set()
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(alias.name for alias in node.names if (PACKAGE / f"{alias.name}.py").exists())
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dist_finetune."):
            found.add(node.module.split(".")[1])
    return found


def test_imports_for_annotations_only_are_not_layering_imports(tmp_path):
    """An import under ``if TYPE_CHECKING:`` does not count; the same import anywhere else does."""
    source = tmp_path / "module.py"
    source.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .trainer import Trainer\n"
                      "else:\n    from .errors import ConfigError\ndef f():\n    from .config import RunConfig\n")
    assert our_imports(source) == {"errors", "config"}


def test_every_module_is_in_the_layout_and_imports_only_what_comes_before_it():
    order = documented_order()
    modules = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "__main__"))
    assert sorted(order) == modules, f"{LAYOUT_PAGE.name} Layout lists {sorted(order)}, the package has {modules}"
    for position, name in enumerate(order):
        later = our_imports(PACKAGE / f"{name}.py") - set(order[:position])
        assert not later, f"{name}.py imports {sorted(later)}, listed after it in {LAYOUT_PAGE.name}'s Layout"


def test_no_module_is_much_over_400_lines():
    sizes = {p.name: len(p.read_text().splitlines()) for p in PACKAGE.glob("*.py")}
    assert max(sizes.values()) <= MAX_LINES, sorted(sizes.items(), key=lambda item: -item[1])[:3]


def test_the_run_state_annotations_name_real_types():
    """``RunState``'s fields are typed through imports for annotations only: with those imports run, every
    annotation resolves, and none is ``Any``."""
    import typing

    from dist_finetune import callbacks

    tree = ast.parse((PACKAGE / "callbacks.py").read_text())
    block = next(node for node in tree.body if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING")
    namespace = dict(vars(callbacks))
    exec(compile(ast.Module(body=block.body, type_ignores=[]), "callbacks.py", "exec"), namespace)
    hints = typing.get_type_hints(callbacks.RunState, globalns=namespace)
    assert hints["optimizer"] == typing.Optional[namespace["Optimizer"]]
    assert typing.Any not in hints.values()
