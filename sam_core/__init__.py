"""The frozen SAM core: image encoder (timm's VisionTransformerSAM), prompt encoder, mask decoder,
checkpoint loading, the predictor and the automatic mask generator. Knows nothing of adapters.
"""
from .build import ARCHS, SamArch, build_sam
from .checkpoint import CheckpointError, load_sam, read_state_dict
from .checkpoint_file import CheckpointFile
from .predictor import ImageEmbedding, SamPredictor
from .sam import Sam
from .transforms import ResizeLongestSide

__all__ = [
    "ARCHS", "SamArch", "build_sam", "load_sam", "read_state_dict", "CheckpointError", "CheckpointFile",
    "Sam", "SamPredictor", "ImageEmbedding", "ResizeLongestSide", "SamAutomaticMaskGenerator",
]


def __getattr__(name):
    if name == "SamAutomaticMaskGenerator":
        from .automatic_mask_generator import SamAutomaticMaskGenerator
        return SamAutomaticMaskGenerator
    raise AttributeError(name)
