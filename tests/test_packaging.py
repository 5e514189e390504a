"""setup.py's lower bounds against the APIs the code calls: a floor below the release that added one
lets pip install a version on which the product fails (starlette 0.37-0.39 made every multipart
request a 500, since they lack MultiPartParser's max_part_size)."""

from __future__ import annotations

import re

import pytest

from tests.conftest import REPO

# distribution -> (what the code calls, where, the first release that has it)
NEEDS = [
    ("starlette", "max_part_size=", "plugin/inference/serving.py", (0, 40)),
    ("python-multipart", '"python_multipart"', "plugin/inference/serve.py", (0, 0, 13)),
    ("uvicorn", "timeout_graceful_shutdown=", "plugin/inference/serve.py", (0, 22)),
    ("torch", "get_total_norm(", "plugin/training/guard.py", (2, 6)),
]


def floors() -> dict[str, tuple[int, ...]]:
    text = (REPO / "setup.py").read_text()
    return {name: tuple(int(part) for part in version.split("."))
            for name, version in re.findall(r'"([A-Za-z0-9_.-]+)>=([0-9.]+)', text)}


@pytest.mark.parametrize(("distribution", "call", "path", "release"), NEEDS, ids=[n[0] for n in NEEDS])
def test_each_floor_has_the_api_the_code_calls(distribution: str, call: str, path: str, release: tuple) -> None:
    assert call in (REPO / path).read_text(), f"{path} no longer calls {call}: update NEEDS"
    assert floors()[distribution] >= release, (
        f"setup.py allows {distribution} {floors()[distribution]}, but {path} calls {call}, added in {release}")
