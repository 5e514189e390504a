"""Print setup.py's install_requires, one per line; with `--extra NAME`, that extra's packages instead.

The image installs the dependencies from this list in a layer of their own, before any source file is
copied in, so a code change rebuilds only the small package layer. Reading setup.py (not a second
requirements file) keeps one list of dependencies; the serve image adds the `serve` extra.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path


def install_requires(setup_py: Path) -> list[str]:
    for node in ast.walk(ast.parse(setup_py.read_text(encoding="utf-8"))):
        if isinstance(node, ast.keyword) and node.arg == "install_requires":
            return list(ast.literal_eval(node.value))
    raise SystemExit(f"{setup_py}: no literal install_requires=[...] to read")


def extra_requires(setup_py: Path, extra: str) -> list[str]:
    """extras_require[extra]: a literal list, or a module-level NAME = [...] it names (SERVE = [...])."""
    tree = ast.parse(setup_py.read_text(encoding="utf-8"))
    lists = {
        target.id: node.value
        for node in tree.body if isinstance(node, ast.Assign)
        for target in node.targets if isinstance(target, ast.Name)
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "extras_require" and isinstance(node.value, ast.Dict):
            for key, value in zip(node.value.keys, node.value.values):
                if isinstance(key, ast.Constant) and key.value == extra:
                    return list(ast.literal_eval(lists[value.id] if isinstance(value, ast.Name) else value))
    raise SystemExit(f"{setup_py}: no extra {extra!r} in a literal extras_require={{...}}")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[2] == "--extra":
        print("\n".join(extra_requires(Path(sys.argv[1]), sys.argv[3])))
    else:
        print("\n".join(install_requires(Path(sys.argv[1]))))
