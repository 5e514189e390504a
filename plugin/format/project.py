"""A Supervisely project on disk: meta.json, datasets (img/ + ann/), annotations and images.

Older exports read too: annotations named after the image stem, objects without geometryType, images
without tags, tags as bare strings, and meta.json with img_tags/obj_tags instead of tags.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from plugin.errors import TaskError
from plugin.files import read_json
from plugin.format.geometry import Geometry, crop_to_image, object_shape, parse_geometry
from plugin.format.images import ACCEPTED_NAMES, check_image_pixels

log = logging.getLogger(__name__)

# The SDK's image extensions that OpenCV decodes; the format itself is then checked by content (images.py).
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jfif", ".mpo", ".bmp", ".png", ".webp", ".tiff", ".tif"})

# Classes whose objects were skipped as not drawable; the warning is for the class, once per process,
# not for each of its (possibly thousands of) objects.
_warned_skipped_classes: set[str] = set()


@dataclass(frozen=True)
class ObjClass:
    title: str
    shape: str
    color: str


@dataclass
class ProjectMeta:
    classes: list[ObjClass]
    tags: list[dict]
    raw: dict

    def class_by_title(self, title: str) -> ObjClass | None:
        return next((c for c in self.classes if c.title == title), None)


@dataclass(frozen=True)
class Item:
    dataset: str
    name: str  # the image file name
    image_path: Path
    ann_path: Path


@dataclass
class Label:
    class_title: str
    geometry: Geometry


@dataclass
class Annotation:
    height: int
    width: int
    tags: set[str]
    labels: list[Label]  # in JSON order, already cropped to the image


def find_project(data_dir: Path) -> Path:
    """data_dir itself when it holds meta.json, else its one project subfolder (one more level is tried)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise TaskError("the data directory does not exist", where=data_dir)
    if (data_dir / "meta.json").is_file():
        return data_dir
    for pattern in ("*/meta.json", "*/*/meta.json"):
        found = sorted(
            p.parent for p in data_dir.glob(pattern)
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(data_dir).parts)
        )
        if len(found) == 1:
            return found[0]
        if found:
            names = ", ".join(str(p.relative_to(data_dir)) for p in found)
            raise TaskError(f"found {len(found)} projects ({names}); expected exactly one", where=data_dir)
    raise TaskError("no project in data/: neither it nor its subfolders hold a meta.json", where=data_dir)


def read_meta(project_dir: Path) -> ProjectMeta:
    path = Path(project_dir) / "meta.json"
    raw = read_json(path)
    classes_json = raw.get("classes", [])
    if not isinstance(classes_json, list):
        raise TaskError("'classes' must be a list", where=path)
    classes: list[ObjClass] = []
    for i, cls in enumerate(classes_json):
        fields = {key: cls.get(key) if isinstance(cls, dict) else None for key in ("title", "shape", "color")}
        missing = [key for key, value in fields.items() if not isinstance(value, str) or not value]
        if missing:
            raise TaskError(f"classes[{i}] needs a non-empty string {' and '.join(missing)}", where=path)
        if any(c.title == fields["title"] for c in classes):
            raise TaskError(f"class title {fields['title']!r} appears twice", where=path)
        classes.append(ObjClass(**fields))
    return ProjectMeta(classes=classes, tags=_meta_tags(raw, path), raw=raw)


def list_items(project_dir: Path) -> list[Item]:
    """Every image of every dataset with its annotation, sorted by (dataset, name).

    An image without its annotation or an annotation without its image is an error, so that a
    half-copied project is never trained on silently.
    """
    project_dir = Path(project_dir)
    items: list[Item] = []
    for dataset_dir in sorted(p for p in project_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        img_dir, ann_dir = dataset_dir / "img", dataset_dir / "ann"
        if not img_dir.is_dir() and not ann_dir.is_dir():
            log.warning(
                f"{dataset_dir.name}: not a dataset (no img/ and no ann/), skipped",
                extra={"dataset_dir": str(dataset_dir)},
            )
            continue
        for required in (img_dir, ann_dir):
            if not required.is_dir():
                raise TaskError(f"the dataset has no {required.name}/ folder", where=dataset_dir)
        items.extend(_dataset_items(dataset_dir.name, img_dir, ann_dir))
    if not items:
        raise TaskError("the project is empty: no dataset holds an image", where=project_dir)
    return sorted(items, key=lambda item: (item.dataset, item.name))


def read_annotation(path: Path, meta: ProjectMeta) -> Annotation:
    """The annotation with its objects parsed and cropped to `size`; unknown classes and malformed
    objects are errors naming the file and the object, types masks do not draw are skipped."""
    return parse_annotation(read_json(path), meta, path)


def parse_annotation(doc: dict, meta: ProjectMeta, path: Path) -> Annotation:
    """read_annotation for a document already read (inference keeps the raw objects to write them back)."""
    size = doc.get("size")
    height = size.get("height") if isinstance(size, dict) else None
    width = size.get("width") if isinstance(size, dict) else None
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (height, width)):
        raise TaskError("'size' must be {\"height\": H, \"width\": W} with positive integers", where=path)
    # Masks of this size are allocated from it, before any image is compared with it.
    check_image_pixels(width, height, "the annotation's 'size'", path)
    objects = doc.get("objects")
    if not isinstance(objects, list):
        raise TaskError("'objects' must be a list", where=path)
    labels: list[Label] = []
    for i, obj in enumerate(objects):
        title = obj.get("classTitle") if isinstance(obj, dict) else None
        if not isinstance(title, str):
            raise TaskError(f"objects[{i}] has no classTitle", where=path)
        obj_class = meta.class_by_title(title)
        if obj_class is None:
            raise TaskError(f"objects[{i}] has class {title!r}, which meta.json does not define", where=path)
        geometry = parse_geometry(obj, obj_class.shape, where=f"{path}: objects[{i}] (class {title!r})")
        if geometry is None:
            _warn_skipped(title, object_shape(obj, obj_class.shape), path)
            continue
        labels.extend(Label(title, piece) for piece in crop_to_image(geometry, height, width))
    return Annotation(height=height, width=width, tags=_tag_names(doc, path), labels=labels)


def read_image_tags(path: Path) -> set[str]:
    """Only the image tag names of an annotation file (its objects are not parsed)."""
    return _tag_names(read_json(path), path)


def check_image_size(item: Item, ann: Annotation, height: int, width: int) -> None:
    """An annotation must describe its image's real size: objects are cropped to `size`, not to the pixels."""
    if (ann.height, ann.width) != (height, width):
        raise TaskError(
            f"the annotation says the image is {ann.width}x{ann.height} (width x height), "
            f"but {item.image_path.name} is {width}x{height}",
            where=item.ann_path,
        )


def link_or_copy(src: Path, dst: Path) -> None:
    """Put the file src names at dst as a hard link (no copy of a large image), or as a copy where no link
    can be made (another file system). dst must not exist: nothing is written through what is there."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    # os.link on Linux links a symlink itself, not its target: the output would hold a link that
    # dangles or points back into the input.
    target = os.path.realpath(src)
    try:
        os.link(target, dst)
    except FileExistsError:
        raise TaskError("the output file already exists", where=dst) from None
    except OSError:
        shutil.copy2(target, dst)


def _meta_tags(raw: dict, path: Path) -> list[dict]:
    """Tag metas from `tags`, or from the old format's img_tags + obj_tags (mixing both is an error)."""
    sections = {key: raw.get(key) or [] for key in ("tags", "img_tags", "obj_tags")}
    for key, section in sections.items():
        if not isinstance(section, list):
            raise TaskError(f"'{key}' must be a list", where=path)
    if sections["tags"] and (sections["img_tags"] or sections["obj_tags"]):
        raise TaskError("meta.json mixes 'tags' with the old 'img_tags'/'obj_tags'; use one format", where=path)
    tags: list[dict] = []
    for key, section in sections.items():
        for i, tag in enumerate(section):
            if isinstance(tag, str):
                tag = {"name": tag, "value_type": "none"}
            if not isinstance(tag, dict) or not isinstance(tag.get("name"), str):
                raise TaskError(f"{key}[{i}] must be a tag name or an object with a 'name'", where=path)
            if all(t["name"] != tag["name"] for t in tags):
                tags.append(tag)
    return tags


def _tag_names(doc: dict, path: Path) -> set[str]:
    tags = doc.get("tags", [])
    if not isinstance(tags, list):
        raise TaskError("'tags' must be a list", where=path)
    names = set()
    for i, tag in enumerate(tags):
        name = tag.get("name") if isinstance(tag, dict) else tag
        if not isinstance(name, str):
            raise TaskError(f"tags[{i}] must be a tag name or an object with a 'name'", where=path)
        names.add(name)
    return names


def _dataset_items(dataset: str, img_dir: Path, ann_dir: Path) -> list[Item]:
    # Dot files are not data: macOS leaves "._name.png" companions next to copied files.
    files = [p for d in (img_dir, ann_dir) for p in d.iterdir() if p.is_file() and not p.name.startswith(".")]
    images = sorted(p for p in files if p.parent == img_dir and p.suffix.lower() in IMAGE_EXTENSIONS)
    annotations = {p.name: p for p in files if p.parent == ann_dir and p.name.endswith(".json")}
    claimed: dict[str, Path] = {}
    items = []
    missing = []
    for image in images:
        # Current exports name the annotation after the whole file name, older ones after the stem.
        ann_name = next((n for n in (f"{image.name}.json", f"{image.stem}.json") if n in annotations), None)
        if ann_name is None:
            missing.append(image)
            continue
        if ann_name in claimed:
            raise TaskError(
                f"the annotation belongs to two images: {claimed[ann_name].name} and {image.name}",
                where=annotations[ann_name],
            )
        claimed[ann_name] = image
        items.append(Item(dataset=dataset, name=image.name, image_path=image, ann_path=annotations[ann_name]))
    if missing:
        raise TaskError(
            f"the image has no annotation: expected ann/{missing[0].name}.json{_and_more(missing)}",
            where=missing[0],
        )
    orphans = sorted(path for name, path in annotations.items() if name not in claimed)
    # What an orphan's image would be (current exports' naming), when it is there but not an image.
    named = [img_dir / path.name[: -len(".json")] for path in orphans]
    dangling = [path for path in named if path.is_symlink() and not path.exists()]
    if dangling:
        target = os.readlink(dangling[0])
        raise TaskError(f"the image is a symbolic link to {target}, which does not exist", where=dangling[0])
    unaccepted = [path for path in named if path.is_file()]
    if unaccepted:
        raise TaskError(
            f"{unaccepted[0].suffix or 'no extension'} is not an image extension (the accepted ones are "
            f"{', '.join(sorted(IMAGE_EXTENSIONS))}, for the formats {ACCEPTED_NAMES}){_and_more(unaccepted)}",
            where=unaccepted[0],
        )
    if orphans:
        raise TaskError(f"the annotation has no image in img/{_and_more(orphans)}", where=orphans[0])
    return items


def _and_more(paths: list[Path]) -> str:
    return f" (and {len(paths) - 1} more like it in this dataset)" if len(paths) > 1 else ""


def _warn_skipped(title: str, shape: str | None, path: Path) -> None:
    if title in _warned_skipped_classes:
        return
    _warned_skipped_classes.add(title)
    what = f"{shape} objects" if shape else "objects without a geometry type"
    log.warning(
        f"class {title!r}: {what} are not drawn into masks and are skipped (warned once per class)",
        extra={"class_title": title, "geometry_type": shape, "annotation": str(path)},
    )
