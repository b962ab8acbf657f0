"""The retinanet family: RetinaNet (ResNet + FPN + class / box subnets) with the FreeAnchor or the RetinaNet loss."""

from tfreward.models.retinanet.model import RetinaNet
from tfreward.models.retinanet.options import RetinaNetOptions

__all__ = ["RetinaNet", "RetinaNetOptions"]
