"""Class title -> mask index, as the legacy plugin builds it (so checkpoints stay interchangeable):
background 0, the other titles sorted 1..N, neutral the fixed index 255 (kept out of the saved mapping)."""

from __future__ import annotations

from dataclasses import dataclass

from plugin.errors import TaskError
from plugin.format.project import ProjectMeta

NEUTRAL_INDEX = 255
BACKGROUND_COLOR = "#222222"


@dataclass(frozen=True)
class ClassMapping:
    title_to_idx: dict[str, int]  # background -> 0, other non-neutral titles sorted -> 1..N; no neutral
    background: str
    neutral: str
    out_classes: list[dict]  # the model's classes as the legacy config.json lists them

    @property
    def num_classes(self) -> int:
        return max(self.title_to_idx.values()) + 1

    def index_of(self, title: str) -> int:
        if title == self.neutral:
            return NEUTRAL_INDEX
        try:
            return self.title_to_idx[title]
        except KeyError:
            raise TaskError(f"class {title!r} has no index in the class mapping") from None

    def with_neutral(self) -> dict[str, int]:
        return {**self.title_to_idx, self.neutral: NEUTRAL_INDEX}


def titles_by_index(title_to_idx: dict[str, int]) -> list[str]:
    """Class titles in model-output order; an index no title uses (possible in an old mapping) gets a placeholder."""
    by_index = {idx: title for title, idx in title_to_idx.items()}
    return [by_index.get(i, f"class_{i}") for i in range(max(title_to_idx.values()) + 1)]


def create_mapping(meta: ProjectMeta, background: str, neutral: str) -> ClassMapping:
    if background == neutral:
        raise TaskError(f"background and neutral are both {background!r}; they must differ", where="special_classes")
    others = sorted({c.title for c in meta.classes} - {background, neutral})
    # Indices must stay below 255, which is neutral in the uint8 masks.
    if len(others) >= NEUTRAL_INDEX:
        raise TaskError(
            f"the project has {len(others)} classes besides background and neutral; at most {NEUTRAL_INDEX - 1} fit",
            where="meta.json",
        )
    title_to_idx = {background: 0, **{title: i for i, title in enumerate(others, start=1)}}
    out_classes = [_out_class(c.title, c.color) for c in meta.classes if c.title != neutral]
    if meta.class_by_title(background) is None:
        out_classes.append(_out_class(background, BACKGROUND_COLOR))
    return ClassMapping(title_to_idx=title_to_idx, background=background, neutral=neutral, out_classes=out_classes)


def check_continue_training(mapping: ClassMapping, saved_title_to_idx: dict[str, int], where: str) -> None:
    """continue_training needs the model's classes and indices to be exactly the project's."""
    bad = [t for t, i in saved_title_to_idx.items() if not isinstance(t, str) or type(i) is not int]
    if bad or not saved_title_to_idx:
        raise TaskError("the model's class_title_to_idx must map class titles to integer indices", where=where)
    model, project = set(saved_title_to_idx), set(mapping.title_to_idx)
    problems = []
    if model - project:
        problems.append(f"only in the model: {', '.join(map(repr, sorted(model - project)))}")
    if project - model:
        problems.append(f"only in the project: {', '.join(map(repr, sorted(project - model)))}")
    moved = sorted(t for t in model & project if saved_title_to_idx[t] != mapping.title_to_idx[t])
    if moved:
        problems.append("different index: " + ", ".join(
            f"{t!r} is {saved_title_to_idx[t]} in the model, {mapping.title_to_idx[t]} in the project" for t in moved
        ))
    if problems:
        raise TaskError(
            "unable to continue_training: the classes of the model and of the project do not match; "
            + "; ".join(problems),
            where=where,
        )


def _out_class(title: str, color: str) -> dict:
    return {"title": title, "shape": "bitmap", "color": color, "geometry_config": {}}
