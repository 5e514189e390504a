"""The model server's container command, with the Supervisely SDK's two verbs:

    docker run ... sly-unet-serve [deploy] [--model DIR] [--device cuda:0] [--runtime PyTorch] [...]
    docker run ... sly-unet-serve predict IMAGE_OR_DIR --model DIR [--output DIR] [...]

`deploy` (or no verb, the legacy REST server's way) serves on every address at port 8000, the model
in /sly_task_data/model unless --model says otherwise; `predict` predicts in the container and writes
a Supervisely project to --output (default ./predictions), then exits.
"""

import sys

from plugin.cli import main


def command(argv: list[str]) -> list[str]:
    """The sly-unet command line of the container's arguments."""
    if argv[:1] == ["predict"]:
        return argv
    if argv[:1] == ["deploy"]:
        argv = argv[1:]
    return ["serve", "--host", "0.0.0.0", *argv]


if __name__ == "__main__":
    sys.exit(main(command(sys.argv[1:])))
