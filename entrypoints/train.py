"""The train container's command: `python -m entrypoints.train [--task-dir DIR] [--log-format json|human|auto]`."""

import sys

from plugin.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
