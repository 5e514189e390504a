"""sly-unet: the UNet v2 semantic-segmentation plugin for Supervisely-style task directories."""

__version__ = "0.1.0"
