"""Print setup.py's install_requires, one per line.

The image installs the dependencies from this list in a layer of their own, before any source file is
copied in, so a code change rebuilds only the small package layer. Reading setup.py (not a second
requirements file) keeps one list of dependencies.
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


if __name__ == "__main__":
    print("\n".join(install_requires(Path(sys.argv[1]))))
