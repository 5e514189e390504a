"""A command's own peak memory: `python -m MODULE ARGS` run through a shim that writes the process's
VmHWM (in bytes) to a file at exit.

The kernel's ru_maxrss of a child is no use: exec keeps the peak of the memory it replaces, which for
a child of a benchmark or of the test process is theirs, gigabytes by then. The inference benchmark
and tests/test_hostile_e2e.py measure through this.
"""

from __future__ import annotations

import sys
from pathlib import Path

_PEAK_SHIM = """
import atexit, runpy, sys
peak_file = sys.argv.pop(1)
def record():
    with open("/proc/self/status") as status:
        kib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    with open(peak_file, "w") as out:
        out.write(str(kib * 1024))
atexit.register(record)
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def measured_command(module: str, args: list[str], peak_file: Path) -> list[str]:
    """The command line that runs `python -m module args` and writes its peak memory to peak_file."""
    return [sys.executable, "-c", _PEAK_SHIM, str(peak_file), module, *args]


def read_peak(peak_file: Path) -> int:
    """The peak, in bytes, that a measured command wrote."""
    return int(peak_file.read_text())
