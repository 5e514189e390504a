from __future__ import annotations

from pathlib import Path

import pytest

from plugin.errors import TaskError
from plugin.task_dir import DEFAULT_TASK_DIR, TaskDir, resolve_task_dir


@pytest.fixture
def two_dirs(tmp_path: Path) -> tuple[Path, Path]:
    (tmp_path / "from_arg").mkdir()
    (tmp_path / "from_env").mkdir()
    return tmp_path / "from_arg", tmp_path / "from_env"


def test_arg_wins_over_env(two_dirs, monkeypatch):
    from_arg, from_env = two_dirs
    monkeypatch.setenv("SLY_TASK_DIR", str(from_env))
    assert resolve_task_dir(str(from_arg)) == TaskDir(from_arg)


def test_env_used_without_arg(two_dirs, monkeypatch):
    _, from_env = two_dirs
    monkeypatch.setenv("SLY_TASK_DIR", str(from_env))
    assert resolve_task_dir(None).root == from_env
    assert resolve_task_dir("").root == from_env


def test_relative_path_becomes_absolute(tmp_path, monkeypatch):
    (tmp_path / "task").mkdir()
    monkeypatch.chdir(tmp_path)
    assert resolve_task_dir("task").root == tmp_path / "task"


@pytest.mark.skipif(DEFAULT_TASK_DIR.exists(), reason="/sly_task_data exists on this machine")
def test_missing_default_says_how_to_mount(monkeypatch):
    monkeypatch.delenv("SLY_TASK_DIR", raising=False)
    with pytest.raises(TaskError) as info:
        resolve_task_dir(None)
    assert info.value.where == "/sly_task_data"
    text = str(info.value)
    assert text.startswith("/sly_task_data: task directory does not exist")
    assert "docker run -v TASK_DIR:/sly_task_data" in text
    assert "--task-dir" in text and "SLY_TASK_DIR" in text


def test_missing_arg_dir_names_path_and_source(tmp_path, monkeypatch):
    monkeypatch.delenv("SLY_TASK_DIR", raising=False)
    missing = tmp_path / "nope"
    with pytest.raises(TaskError) as info:
        resolve_task_dir(str(missing))
    assert str(info.value) == f"{missing}: task directory (from --task-dir) does not exist"


def test_missing_env_dir_names_source(tmp_path, monkeypatch):
    monkeypatch.setenv("SLY_TASK_DIR", str(tmp_path / "nope"))
    with pytest.raises(TaskError) as info:
        resolve_task_dir(None)
    assert str(info.value) == f"{tmp_path / 'nope'}: task directory (from SLY_TASK_DIR) does not exist"


def test_file_is_not_a_task_dir(tmp_path):
    file = tmp_path / "task_config.json"
    file.write_text("{}")
    with pytest.raises(TaskError, match="is not a directory"):
        resolve_task_dir(str(file))


def test_layout(tmp_path):
    task = resolve_task_dir(str(tmp_path))
    assert task.config_path == tmp_path / "task_config.json"
    assert task.data_dir == tmp_path / "data"
    assert task.model_dir == tmp_path / "model"
    assert task.results_dir == tmp_path / "results"
    assert task.tmp_dir == tmp_path / "tmp"
