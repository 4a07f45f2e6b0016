"""Input transforms shared by the layouts: PIL image -> normalised tensor, tensor resize and channel changes.

Every transform is a small picklable class (not a lambda), so DataLoader workers can use any start method.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torchvision import transforms as T
from torchvision.transforms import functional as TF

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GRAY_MEAN = (0.5,)
GRAY_STD = (0.5,)
LUMA = (0.299, 0.587, 0.114)


def to_channels(x: Tensor, channels: int) -> Tensor:
    """Convert (..., C, H, W) between 1 and 3 channels: gray is replicated, RGB becomes luminance."""
    c = x.shape[-3]
    if c == channels:
        return x
    if c == 1 and channels == 3:
        return x.expand(*x.shape[:-3], 3, *x.shape[-2:]).contiguous()
    if c == 3 and channels == 1:
        w = torch.tensor(LUMA, dtype=x.dtype, device=x.device).view(3, 1, 1)
        return (x * w).sum(dim=-3, keepdim=True)
    raise ValueError(f"cannot convert {c} channels to {channels} (accepted: 1 <-> 3)")


def resize_tensor(x: Tensor, size: int | tuple[int, int]) -> Tensor:
    """Bilinearly resize a (C, H, W) or (N, C, H, W) float tensor to ``size`` (antialiased when shrinking)."""
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(x.shape[-2:]) == hw:
        return x
    batched = x.dim() == 4
    y = x if batched else x.unsqueeze(0)
    shrink = hw[0] < y.shape[-2] or hw[1] < y.shape[-1]
    y = F.interpolate(y, size=hw, mode="bilinear", align_corners=False, antialias=shrink)
    return y if batched else y[0]


class ResizeTensor:
    """Picklable per-item transform: resize a (C, H, W) tensor to ``size`` x ``size``."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, x: Tensor) -> Tensor:
        return resize_tensor(x, self.size)

    def __repr__(self) -> str:
        return f"ResizeTensor({self.size})"


def normalize_stats(channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean/std used for image files: ImageNet statistics for 3 channels, 0.5/0.5 for 1 channel."""
    return (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else (GRAY_MEAN * channels, GRAY_STD * channels)


def high_depth_to_8bit(im: Image.Image, path: str | Path) -> Image.Image:
    """A gray image of more than 8 bits (PIL modes I;16*, I, F) as mode L, scaled by its range: 16-bit / 257;
    32-bit integers and floats by their values (0..1 x 255, 0..255 as is, 0..65535 / 257); NaN/inf or other
    ranges are a ValueError naming the file."""
    if not (im.mode.startswith("I;16") or im.mode in ("I", "F")):
        return im
    import numpy as np

    a = np.asarray(im, dtype=np.float64)
    if not np.isfinite(a).all():
        raise ValueError(f"image file {str(path)!r} holds NaN or inf pixels")
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if im.mode.startswith("I;16") or (im.mode == "I" and hi > 255):
        if lo < 0 or hi > 65535:
            raise ValueError(f"image file {str(path)!r}: pixel values {lo:g}..{hi:g} are outside 0..65535")
        a = a / 257.0
    elif im.mode == "F" and hi <= 1.0 and lo >= 0:
        a = a * 255.0
    elif lo < 0 or hi > 255:
        raise ValueError(f"image file {str(path)!r} (mode {im.mode}): pixel values {lo:g}..{hi:g} are outside "
                         "0..1 and 0..255")
    return Image.fromarray(np.rint(a).astype(np.uint8), "L")


def read_image(path: str | Path, channels: int, gray: bool = False) -> Image.Image:
    """The one image-file reader of training, evaluation and ``mola predict``: ``path`` as an RGB (``channels``
    3) or L image. 16-bit and 32-bit gray images are scaled to 8 bits by their bit depth (PIL's own ``convert``
    would clip them, making every pixel of a 16-bit PNG white); alpha is dropped, palette and CMYK images are
    converted; ``gray`` reads colour images as gray first. Any decoding failure is a ValueError naming the file;
    a decompression bomb one that also names the limit and how to get past it."""
    try:
        with Image.open(path) as im:
            im.load()
            im = high_depth_to_8bit(im, path)
            if gray or channels == 1:
                im = im.convert("L")
            return im.convert("RGB" if channels == 3 else "L")
    except Image.DecompressionBombError as e:
        raise ValueError(f"cannot read image file {str(path)!r}: it is above the decompression-bomb limit of "
                         f"{Image.MAX_IMAGE_PIXELS} pixels (PIL.Image.MAX_IMAGE_PIXELS: {e}); resize it first, or "
                         "raise that limit if you trust the file") from e
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
        raise ValueError(f"cannot read image file {str(path)!r}: {e}") from e


@dataclass
class ImagePreprocessing:
    """How training turned an image into the model input (declared by each image layout on its Scenario,
    ``Scenario.preprocessing``): channels, size, scaling and mean/std. Its ``load`` is the one function that
    turns an image file into an input for evaluation, ``mola predict`` and ``mola export``, and for training
    without augmentation (``ImageFileTransform``).

    ``resize="pil"``: PIL bilinear resize, then [0, 1] and mean/std (image-file layouts);
    ``resize="tensor"``: [0, 1], mean/std, then bilinear resize of the tensor (array layouts such as MedMNIST);
    ``resize="crop"``: shorter side to 256/224 of the size, centre crop (``data.augment: paper``'s eval transform).
    Files are read by ``read_image`` (gray replicated to RGB, RGB to luminance, 16-bit scaled, alpha dropped).
    """

    channels: int
    size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize: str = "tensor"
    gray: bool = False

    def load(self, path: str | Path) -> Tensor:
        """The (C, H, W) float input for one image file; ValueError naming the file on a bad image."""
        return self.tensor_of(read_image(path, self.channels, self.gray))

    def tensor_of(self, im: Image.Image) -> Tensor:
        """The (C, H, W) float input for one PIL image (already in the right mode, see ``read_image``)."""
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


class ImageFileTransform:
    """Open an image file lazily and turn it into a normalised (C, size, size) float tensor.

    ``recipe="domainbed"``: eval resizes to ``size`` x ``size``; train with ``augment``: random resized crop
    (scale 0.7..1), horizontal flip, colour jitter 0.3 and 10 % grayscale. ``recipe="paper"`` (``data.augment:
    paper``, the paper's VLCS / Office-Home transforms): eval resizes the short side to ``size * 256/224`` and
    center-crops ``size``; train: random resized crop (scale 0.7..1, bicubic), flip, colour jitter 0.4
    (brightness, contrast, saturation, hue) and 10 % grayscale. Then ToTensor and mean/std normalisation.
    ``gray=True`` reads every image as grayscale first (replicated when ``channels`` is 3).
    """

    def __init__(self, size: int, channels: int = 3, augment: bool = False, gray: bool = False,
                 recipe: str = "domainbed") -> None:
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        if recipe not in ("domainbed", "paper"):
            raise ValueError(f"unknown augmentation recipe {recipe!r}; accepted: domainbed, paper")
        self.size, self.channels, self.augment, self.gray, self.recipe = size, channels, augment, gray, recipe
        mean, std = normalize_stats(channels)
        color = channels == 3 and not gray
        jitter = 0.4 if recipe == "paper" else 0.3
        if augment:
            crop = (T.RandomResizedCrop(size, scale=(0.7, 1.0), interpolation=T.InterpolationMode.BICUBIC)
                    if recipe == "paper" else T.RandomResizedCrop(size, scale=(0.7, 1.0)))
            hue = jitter if color else 0.0
            ops: list = [crop, T.RandomHorizontalFlip(), T.ColorJitter(jitter, jitter, jitter, hue)]
            if color:
                ops.append(T.RandomGrayscale(0.1))
        elif recipe == "paper":
            ops = [T.Resize(round(size * 256 / 224)), T.CenterCrop(size)]
        else:
            ops = [T.Resize((size, size))]
        self.pipeline = T.Compose([*ops, T.ToTensor(), T.Normalize(mean, std)])
        # without augmentation: the layout's declared preprocessing, the one function eval and predict use too
        self.preprocessing = ImagePreprocessing.normalized((channels, size, size), mean, std,
                                                           resize="crop" if recipe == "paper" else "pil", gray=gray)

    def load(self, path: str | Path) -> Image.Image:
        """``read_image(path, channels, gray)``."""
        return read_image(path, self.channels, self.gray)

    def __call__(self, path: str | Path) -> Tensor:
        if self.augment:
            return self.pipeline(self.load(path))
        return self.preprocessing.load(path)

    def __repr__(self) -> str:
        return (
            f"ImageFileTransform(size={self.size}, channels={self.channels}, augment={self.augment}, "
            f"gray={self.gray}, recipe={self.recipe!r})"
        )
