"""The deeplab family: DeepLabv3 semantic segmentation on a dilated ResNet."""

from tfreward.models.deeplab.layers import ASPP, SegmentationHead
from tfreward.models.deeplab.model import DeepLab
from tfreward.models.deeplab.options import DeepLabOptions

__all__ = ["ASPP", "DeepLab", "DeepLabOptions", "SegmentationHead"]
