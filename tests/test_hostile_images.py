"""Hostile and unusual input, one function at a time: image formats, bombs and the pixel limit, deep
JSON, and writing without following symbolic links."""

from __future__ import annotations

import base64
import json
import os
import struct
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from plugin.errors import TaskError
from plugin.files import MAX_JSON_DEPTH, read_json, refuse_symlink, write_file, write_json
from plugin.format import images
from plugin.format.geometry import decode_bitmap
from plugin.format.images import (
    DEFAULT_MAX_IMAGE_PIXELS,
    max_image_pixels,
    read_image,
    read_image_size,
    set_max_image_pixels,
)
from plugin.format.project import link_or_copy, list_items, parse_annotation, read_meta

BOMB_SIDE = 60_000  # 3.6e9 pixels: 10 GiB as RGB, from a file of 100 bytes
BITMAP_BOMB_SIDE = 40_000
HUGE_SIDE = 2_000_000


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(width: int, height: int) -> bytes:
    """A valid PNG header declaring width x height RGB pixels, with one tiny IDAT: a few bytes that
    a decoder would have to blow up to the declared size."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(bytes(64)))
            + png_chunk(b"IEND", b""))


def bitmap_bomb() -> str:
    """bitmap.data as the SDK writes it, base64(zlib(PNG)), of a PNG declaring 40000 x 40000 pixels."""
    return base64.b64encode(zlib.compress(png_bomb(BITMAP_BOMB_SIDE, BITMAP_BOMB_SIDE))).decode()


@pytest.fixture
def pixel_limit() -> Iterator[Callable[[int], None]]:
    """set_max_image_pixels, restored to the default afterwards."""
    yield set_max_image_pixels
    set_max_image_pixels(DEFAULT_MAX_IMAGE_PIXELS)


def sample_rgb(height: int = 24, width: int = 32, seed: int = 0) -> np.ndarray:
    """Smooth colours plus noise: every channel differs, so a swapped or dropped channel shows."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:height, 0:width]
    base = np.stack([rows * 200 // height, cols * 200 // width, (rows + cols) * 100 // (height + width)], axis=2)
    return np.clip(base + rng.integers(0, 50, (height, width, 3)), 0, 255).astype(np.uint8)


# --- formats: each writer saves rgb in its format and returns what read_image must give back ---------

def write_png16(path: Path, rgb: np.ndarray) -> np.ndarray:
    # v * 257 is exact in 16 bits and maps back to v whether a decoder scales (/257) or shifts (>> 8).
    cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR).astype(np.uint16) * 257)
    return rgb


def write_grey(path: Path, rgb: np.ndarray) -> np.ndarray:
    grey = Image.fromarray(rgb).convert("L")
    grey.save(path)
    return np.repeat(np.asarray(grey)[:, :, None], 3, axis=2)


def write_palette(path: Path, rgb: np.ndarray) -> np.ndarray:
    palette = Image.fromarray(rgb).quantize(64)
    palette.save(path, transparency=0)  # a transparent entry, as in many palette PNGs: alpha is dropped
    return np.asarray(palette.convert("RGB"))


def write_rgba(path: Path, rgb: np.ndarray) -> np.ndarray:
    alpha = np.linspace(0, 255, rgb.shape[0] * rgb.shape[1]).reshape(rgb.shape[:2]).astype(np.uint8)
    Image.fromarray(np.dstack([rgb, alpha])).save(path)
    return rgb  # the SDK drops alpha without blending


def write_cmyk_jpeg(path: Path, rgb: np.ndarray) -> np.ndarray:
    Image.fromarray(rgb).convert("CMYK").save(path, quality=95)
    with Image.open(path) as img:
        assert img.mode == "CMYK"
        return np.asarray(img.convert("RGB"))  # Pillow's reading of the same file


def write_mpo(path: Path, rgb: np.ndarray) -> np.ndarray:
    # A camera's multi-picture JPEG; the SDK, like OpenCV, reads the first picture.
    Image.fromarray(rgb).save(path, format="MPO", save_all=True, append_images=[Image.fromarray(255 - rgb)], quality=95)
    with Image.open(path) as img:
        assert (img.format, img.n_frames) == ("MPO", 2)
        return np.asarray(img.convert("RGB"))


def write_webp(path: Path, rgb: np.ndarray) -> np.ndarray:
    Image.fromarray(rgb).save(path, lossless=True)
    return rgb


def write_plain(path: Path, rgb: np.ndarray) -> np.ndarray:
    Image.fromarray(rgb).save(path)  # format from the suffix
    return rgb


# name -> (file suffix, writer, largest channel difference allowed from the writer's expectation)
FORMATS: dict[str, tuple[str, Callable[[Path, np.ndarray], np.ndarray], int]] = {
    "png16": (".png", write_png16, 0),
    "grey_png": (".png", write_grey, 0),
    "palette_png": (".png", write_palette, 0),
    "rgba_png": (".png", write_rgba, 0),
    # libjpeg-turbo (OpenCV) and Pillow's libjpeg round the colour conversion differently.
    "cmyk_jpeg": (".jpg", write_cmyk_jpeg, 2),
    "mpo": (".mpo", write_mpo, 2),
    "webp": (".webp", write_webp, 0),
    "tiff": (".tif", write_plain, 0),
    "bmp": (".bmp", write_plain, 0),
}


@pytest.mark.parametrize("name", FORMATS)
def test_every_accepted_format_decodes_to_rgb_uint8(tmp_path: Path, name: str) -> None:
    suffix, write, tolerance = FORMATS[name]
    path = tmp_path / f"image{suffix}"
    expected = write(path, sample_rgb())
    image = read_image(path)
    assert image.dtype == np.uint8 and image.shape == (24, 32, 3)
    assert np.abs(image.astype(int) - expected.astype(int)).max() <= tolerance
    assert read_image_size(path) == (24, 32)


def test_16_bit_values_are_scaled_to_8_bits(tmp_path: Path) -> None:
    values = np.random.default_rng(3).integers(0, 65536, (8, 9), dtype=np.uint16)
    cv2.imwrite(str(tmp_path / "deep.png"), values)
    with Image.open(tmp_path / "deep.png") as img:
        assert img.mode == "I;16"
    grey = read_image(tmp_path / "deep.png")
    assert (grey == grey[:, :, :1]).all()
    assert np.abs(grey[:, :, 0].astype(float) - values / 257).max() <= 1


@pytest.mark.parametrize("suffix", [".gif", ".ppm", ".ico", ".pcx"])
def test_other_formats_are_refused_with_the_accepted_ones(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"image{suffix}"
    Image.fromarray(sample_rgb()).save(path)
    disguised = tmp_path / "disguised.png"  # the content decides, not the extension
    disguised.write_bytes(path.read_bytes())
    for read in (read_image, read_image_size):
        for target in (path, disguised):
            with pytest.raises(TaskError, match="accepted formats are PNG, JPEG, WebP, TIFF, BMP") as info:
                read(target)
            assert info.value.where == str(target)


def test_images_are_listed_by_the_sdks_extensions(tmp_path: Path) -> None:
    for sub in ("img", "ann"):
        (tmp_path / "ds" / sub).mkdir(parents=True)
    (tmp_path / "meta.json").write_text(json.dumps({"classes": []}))
    ann = json.dumps({"size": {"height": 24, "width": 32}, "tags": [], "objects": []})
    Image.fromarray(sample_rgb()).save(tmp_path / "ds" / "img" / "photo.JFIF", format="JPEG")
    (tmp_path / "ds" / "ann" / "photo.JFIF.json").write_text(ann)
    assert [item.name for item in list_items(tmp_path)] == ["photo.JFIF"]
    Image.fromarray(sample_rgb()).save(tmp_path / "ds" / "img" / "anim.gif")
    (tmp_path / "ds" / "ann" / "anim.gif.json").write_text(ann)
    with pytest.raises(TaskError, match=r"\.gif is not an image extension \(the accepted ones are .*\.jfif") as info:
        list_items(tmp_path)
    assert info.value.where == str(tmp_path / "ds" / "img" / "anim.gif")


def test_a_dangling_symlinked_image_is_named(tmp_path: Path) -> None:
    for sub in ("img", "ann"):
        (tmp_path / "ds" / sub).mkdir(parents=True)
    (tmp_path / "meta.json").write_text(json.dumps({"classes": []}))
    (tmp_path / "ds" / "img" / "gone.png").symlink_to(tmp_path / "moved" / "gone.png")
    (tmp_path / "ds" / "ann" / "gone.png.json").write_text(json.dumps({"size": {"height": 1, "width": 1}}))
    with pytest.raises(TaskError, match=f"a symbolic link to {tmp_path / 'moved'}/gone.png, which does not") as info:
        list_items(tmp_path)
    assert info.value.where == str(tmp_path / "ds" / "img" / "gone.png")


def test_tiff_orientation_is_not_applied_twice(tmp_path: Path) -> None:
    # Pillow reports a TIFF's size already turned by its orientation tag; OpenCV turns the pixels.
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(sample_rgb(24, 32)).save(tmp_path / "turned.tif", exif=exif.tobytes())
    assert read_image(tmp_path / "turned.tif").shape[:2] == read_image_size(tmp_path / "turned.tif") == (32, 24)


# --- the pixel limit: images, bitmaps and annotation sizes --------------------------------------------

@pytest.mark.parametrize("read", [read_image, read_image_size])
@pytest.mark.parametrize("side", [BOMB_SIDE, 30_000])  # 30000^2 is under OpenCV's own limit of 2^30
def test_png_bomb_is_refused_from_its_header(tmp_path: Path, read, side: int) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(png_bomb(side, side))
    with pytest.raises(TaskError) as info:
        read(path)
    assert info.value.where == str(path)
    assert f"{side}x{side}" in info.value.message
    assert f"over the limit of {DEFAULT_MAX_IMAGE_PIXELS} pixels (max_image_pixels" in info.value.message


def test_a_side_over_opencvs_limit_is_refused(tmp_path: Path) -> None:
    (tmp_path / "strip.png").write_bytes(png_bomb(2**20 + 1, 1))
    with pytest.raises(TaskError, match="OpenCV's limit of 1048576 pixels a side"):
        read_image(tmp_path / "strip.png")


def test_the_limit_is_configurable(tmp_path: Path, pixel_limit) -> None:
    assert max_image_pixels() == DEFAULT_MAX_IMAGE_PIXELS == 2**28
    Image.fromarray(sample_rgb(24, 32)).save(tmp_path / "small.png")
    pixel_limit(24 * 32)
    assert read_image(tmp_path / "small.png").shape == (24, 32, 3)
    pixel_limit(24 * 32 - 1)
    with pytest.raises(TaskError, match=f"32x24 .* over the limit of {24 * 32 - 1} pixels"):
        read_image_size(tmp_path / "small.png")
    mask = base64.b64encode(zlib.compress(cv2.imencode(".png", np.full((24, 32), 255, np.uint8))[1].tobytes()))
    with pytest.raises(TaskError, match="the bitmap's PNG is 32x24"):
        decode_bitmap(mask.decode())
    # Raised above OpenCV's own decoding limit, the limit could never be reached.
    pixel_limit(images.OPENCV_MAX_IMAGE_PIXELS)
    (tmp_path / "bomb.png").write_bytes(png_bomb(BOMB_SIDE, BOMB_SIDE))
    with pytest.raises(TaskError, match=f"over the limit of {2**30} pixels"):
        read_image(tmp_path / "bomb.png")


@pytest.mark.parametrize("value", [0, -1, 2**30 + 1, True, 1.5])
def test_a_limit_outside_what_opencv_decodes_is_refused(pixel_limit, value) -> None:
    with pytest.raises(TaskError, match="max_image_pixels: .* is not a pixel count from 1 to 1073741824"):
        pixel_limit(value)
    assert max_image_pixels() == DEFAULT_MAX_IMAGE_PIXELS


def test_a_png_chunk_longer_than_the_file_is_refused(tmp_path: Path) -> None:
    # Found by fuzzing: OpenCV 5 allocates a chunk's declared length, 3 GB for this 200-byte file.
    data = bytearray(cv2.imencode(".png", np.full((6, 5), 255, np.uint8))[1].tobytes())
    idat = data.index(b"IDAT") - 4
    data[idat:idat + 4] = struct.pack(">I", 3_170_893_931)
    (tmp_path / "long.png").write_bytes(data)
    for read in (read_image, read_image_size):
        with pytest.raises(TaskError, match="corrupt or truncated: its 'IDAT' chunk declares 3170893931 bytes") as info:
            read(tmp_path / "long.png")
        assert info.value.where == str(tmp_path / "long.png")
    with pytest.raises(TaskError, match="the bitmap's PNG is corrupt or truncated"):
        decode_bitmap(base64.b64encode(zlib.compress(bytes(data))).decode())


def test_bitmap_bomb_is_refused_before_decoding() -> None:
    side = BITMAP_BOMB_SIDE
    with pytest.raises(TaskError, match=f"the bitmap's PNG is {side}x{side} .* over the limit") as info:
        decode_bitmap(bitmap_bomb(), "ann.json: objects[0]")
    assert info.value.where == "ann.json: objects[0]"


@pytest.mark.parametrize("suffix", [".bmp", ".jpg", ".tif"])
def test_bitmap_data_must_be_a_png(suffix: str) -> None:
    # OpenCV would decode these too, and a JPEG header alone can declare gigapixels.
    mask = np.full((4, 4), 255, np.uint8)
    data = base64.b64encode(zlib.compress(cv2.imencode(suffix, mask)[1].tobytes())).decode()
    with pytest.raises(TaskError, match="it is not a PNG"):
        decode_bitmap(data)


def test_huge_declared_annotation_size_is_refused(tmp_path: Path) -> None:
    (tmp_path / "meta.json").write_text(json.dumps({"classes": []}))
    doc = {"size": {"height": HUGE_SIDE, "width": HUGE_SIDE}, "tags": [], "objects": []}
    with pytest.raises(TaskError) as info:
        parse_annotation(doc, read_meta(tmp_path), tmp_path / "a.png.json")
    assert info.value.where == str(tmp_path / "a.png.json")
    assert f"'size' is {HUGE_SIDE}x{HUGE_SIDE} (width x height) = {HUGE_SIDE**2} pixels" in info.value.message
    assert f"over the limit of {DEFAULT_MAX_IMAGE_PIXELS}" in info.value.message


# --- JSON nesting -------------------------------------------------------------------------------------

@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 600, 100_000])  # 600: json reads it, deepcopy would not
def test_json_nested_too_deep_is_refused(tmp_path: Path, depth: int) -> None:
    (tmp_path / "deep.json").write_text('{"a": ' + "[" * (depth - 1) + "]" * (depth - 1) + "}")
    with pytest.raises(TaskError, match=f"more than {MAX_JSON_DEPTH} levels deep") as info:
        read_json(tmp_path / "deep.json")
    assert info.value.where == str(tmp_path / "deep.json")


def test_json_at_the_depth_limit_is_read(tmp_path: Path) -> None:
    (tmp_path / "ok.json").write_text('{"a": ' + "[" * (MAX_JSON_DEPTH - 1) + "]" * (MAX_JSON_DEPTH - 1) + "}")
    assert "a" in read_json(tmp_path / "ok.json")


# --- writing never goes through a symbolic link -------------------------------------------------------

def test_writing_refuses_a_symlinked_file(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    for name, write in (("a.json", lambda p: write_json(p, {"x": 1})), ("a.png", lambda p: write_file(p, b"x"))):
        link = tmp_path / "out" / name
        link.parent.mkdir(exist_ok=True)
        link.symlink_to(victim)
        with pytest.raises(TaskError, match="symbolic link") as info:
            write(link)
        assert info.value.where == str(link)
    assert victim.read_text() == "keep me"
    write_json(tmp_path / "out" / "new" / "b.json", {"x": 1})  # a plain path is written, its folder created
    assert json.loads((tmp_path / "out" / "new" / "b.json").read_text()) == {"x": 1}


def test_refuse_symlink_names_the_path(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "dir")
    refuse_symlink(tmp_path / "dir")
    refuse_symlink(tmp_path / "absent")
    with pytest.raises(TaskError, match="symbolic link") as info:
        refuse_symlink(tmp_path / "link")
    assert info.value.where == str(tmp_path / "link")


def test_a_symlinked_source_is_linked_as_its_file(tmp_path: Path) -> None:
    real = tmp_path / "store" / "image.png"
    real.parent.mkdir()
    real.write_bytes(b"pixels")
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "image.png").symlink_to(Path("..") / "store" / "image.png")  # relative: dangles when moved
    out = tmp_path / "out" / "img" / "image.png"
    link_or_copy(tmp_path / "img" / "image.png", out)
    assert not out.is_symlink() and os.path.samefile(out, real)
    with pytest.raises(TaskError, match="already exists") as info:
        link_or_copy(real, out)
    assert info.value.where == str(out)
