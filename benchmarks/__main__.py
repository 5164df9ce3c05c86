"""``python -m benchmarks <subcommand> [options]``: one entry point for every benchmark.

A subcommand is a module of this package with a ``main(argv: list[str] | None) -> int`` whose
docstring's first line is its summary; adding one is that module plus one line in ``SUBCOMMANDS``.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import sys

SUBCOMMANDS = {  # name -> module of this package
    "speed": "speed",
    "accuracy": "accuracy",
    "predict": "predict",
    "data": "decode",
    "weights": "weights",
    "data-startup": "data_startup",
    "fsdp-memory": "fsdp_memory",
}


def summary(module: str) -> str:
    """The first line of the module's docstring, read without importing it (no torch for --help)."""
    origin = importlib.util.find_spec(f"{__package__}.{module}").origin
    with open(origin, encoding="utf-8") as handle:
        doc = ast.get_docstring(ast.parse(handle.read())) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {summary(module)}" for name, module in SUBCOMMANDS.items())
    return (f"usage: python -m benchmarks <subcommand> [options]\n\nsubcommands:\n{rows}\n\n"
            "python -m benchmarks <subcommand> --help shows a subcommand's options.")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"unknown subcommand {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"{__package__}.{SUBCOMMANDS[name]}")
    return module.main(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
