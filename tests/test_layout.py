"""The package's layering is what the Layout section says (README.md's "## Layout", the one place
the modules are listed; LAYOUT_PAGE names it): every module is listed there, and each imports (at
module level or inside a function) only modules listed before it, so there are no cycles and the
leaves import nothing of ours. No module grows much past 400 lines."""

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


def our_imports(path: Path) -> set[str]:
    """Modules of the package that ``path`` imports, wherever the import statement stands."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(alias.name for alias in node.names if (PACKAGE / f"{alias.name}.py").exists())
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dist_finetune."):
            found.add(node.module.split(".")[1])
    return found


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
