"""How one image file becomes a model input, declared by each image layout on its Scenario
(``Scenario.preprocessing``) and used by ``mola predict`` and ``mola export``: no list of data kinds elsewhere."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

ACCEPTED_MODES = ("1", "L", "P", "RGB")


@dataclass
class ImagePreprocessing:
    """How training turned an image into the model input: channels, size, scaling and mean/std.

    ``resize="pil"``: PIL bilinear resize, then [0, 1] and mean/std (image-file layouts, ``ImageFileTransform``);
    ``resize="tensor"``: [0, 1], mean/std, then bilinear resize of the tensor (array layouts such as MedMNIST);
    ``resize="crop"``: shorter side to 256/224 of the size, centre crop (``data.augment: paper``'s eval transform).
    Gray and RGB images are converted to ``channels`` as training did (gray replicated, RGB -> luminance).
    """

    channels: int
    size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize: str = "tensor"
    gray: bool = False

    def load(self, path: Path) -> Tensor:
        """The (C, H, W) float input for one image file; ValueError naming the file on a bad image."""
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as im:
                w, h = im.size
                if w * h > (Image.MAX_IMAGE_PIXELS or float("inf")):  # checked before the pixels are decoded
                    raise ValueError(f"image {str(path)!r} has {w}x{h} pixels, above the decompression-bomb limit "
                                     f"of {Image.MAX_IMAGE_PIXELS} (PIL.Image.MAX_IMAGE_PIXELS); resize it first, "
                                     "or raise that limit if you trust the file")
                im.load()
                mode, bands = im.mode, len(im.getbands())
                if mode not in ACCEPTED_MODES or (mode == "P" and "transparency" in im.info):
                    raise ValueError(
                        f"image {str(path)!r} has mode {mode} ({bands} channel(s)); the model expects "
                        f"{self.channels}-channel input and mola predict accepts gray or RGB images (no alpha, "
                        f"CMYK or 16-bit): convert it to {'L' if self.channels == 1 else 'RGB'} first")
                im = im.convert("L" if (self.gray or self.channels == 1) else "RGB")
        except Image.DecompressionBombError as err:
            raise ValueError(f"image {str(path)!r} is above the decompression-bomb limit of {Image.MAX_IMAGE_PIXELS} "
                             f"pixels (PIL.Image.MAX_IMAGE_PIXELS: {err}); resize it first, or raise that limit if you "
                             "trust the file") from err
        except (OSError, UnidentifiedImageError, SyntaxError) as err:
            raise ValueError(f"cannot read image file {str(path)!r}: {err}") from err
        return self._pipeline(im)

    def _pipeline(self, im: Any) -> Tensor:
        from torchvision.transforms import functional as TF

        from mola.data.transforms import resize_tensor, to_channels

        if self.resize == "pil":
            im = TF.resize(im, list(self.size))
        elif self.resize == "crop":
            im = TF.center_crop(TF.resize(im, round(self.size[0] * 256 / 224)), list(self.size))
        x = to_channels(TF.to_tensor(im), self.channels)
        mean = torch.tensor(self.mean, dtype=x.dtype).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype).view(-1, 1, 1)
        x = (x - mean) / std
        return resize_tensor(x, self.size) if self.resize == "tensor" else x

    def to_dict(self) -> dict[str, Any]:
        """Plain values (export.json)."""
        return asdict(self)

    @classmethod
    def normalized(cls, shape: tuple[int, ...], mean: float | tuple[float, ...], std: float | tuple[float, ...],
                   resize: str = "tensor", gray: bool = False) -> ImagePreprocessing:
        """For inputs of ``shape`` (C, H, W) standardised with ``mean``/``std`` (one value or one per channel)."""
        c = shape[0]
        m = tuple(mean) if isinstance(mean, (tuple, list)) else (float(mean),) * c
        s = tuple(std) if isinstance(std, (tuple, list)) else (float(std),) * c
        return cls(c, (shape[1], shape[2]), m, s, resize, gray)


__all__ = ["ACCEPTED_MODES", "ImagePreprocessing"]
