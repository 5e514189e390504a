"""The model server's container command: `python -m entrypoints.serve [--model DIR] [--port N] [...]`.

The legacy REST server's defaults: the model in /sly_task_data/model (sly-unet serve's default too),
listening on every address (a container's port is published from outside it).
"""

import sys

from plugin.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", "--host", "0.0.0.0", *sys.argv[1:]]))
