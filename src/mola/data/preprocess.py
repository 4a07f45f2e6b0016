"""How one image file becomes a model input: ``ImagePreprocessing`` (declared by each image layout on its
Scenario) and the one file reader ``read_image``, defined in ``mola.data.transforms`` next to the training
transforms that use them, and re-exported here for ``mola predict`` and ``mola export``."""

from mola.data.transforms import ImagePreprocessing, read_image

__all__ = ["ImagePreprocessing", "read_image"]
