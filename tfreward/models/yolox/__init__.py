"""The yolox family: YOLOX (CSPDarknet + PAFPN + decoupled head) trained with SimOTA, in static shapes."""

from tfreward.models.yolox.model import Yolox
from tfreward.models.yolox.options import YoloxOptions

__all__ = ["Yolox", "YoloxOptions"]
