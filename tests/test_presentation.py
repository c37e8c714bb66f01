"""Presentation has one home: only the CLI layer (cli.py, console.py) imports rich.

The library returns data and writes its files; the terminal's tables and colours are drawn in
ollama_ft/console.py. The source is read with ast, not imported, so this takes milliseconds.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "ollama_ft"
CLI_LAYER = {"cli.py", "console.py"}


def _imports(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, module) of every import in `tree`, nested ones included; relative imports are ours, not rich."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def _is_rich(module: str) -> bool:
    return module == "rich" or module.startswith("rich.")


def test_only_the_cli_layer_imports_rich() -> None:
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.relative_to(PACKAGE).as_posix() in CLI_LAYER:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        offenders += [f"{path.relative_to(PACKAGE.parent)}:{line}: {module}"
                      for line, module in _imports(tree) if _is_rich(module)]
    assert not offenders, "rich imported outside cli.py/console.py (return data, draw it in console.py):\n" + \
        "\n".join(offenders)
    # cli.py loads rich (through console.py) only inside a command, so `ollama-ft --help` stays instant.
    cli = ast.parse((PACKAGE / "cli.py").read_text(encoding="utf-8"))
    top_level = [module for node in cli.body if isinstance(node, (ast.Import, ast.ImportFrom))
                 for _, module in _imports(node)]
    assert not [m for m in top_level if _is_rich(m) or m == "ollama_ft.console"], top_level
