"""The inference container's command: `python -m entrypoints.inference [--task-dir DIR] [--log-format json|human|auto]`."""

import sys

from plugin.cli import main

if __name__ == "__main__":
    sys.exit(main(["infer", *sys.argv[1:]]))
