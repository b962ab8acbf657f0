"""The group_detr family: Conditional DETR trained with Group DETR's query groups (one-to-many assignment)."""

from tfreward.models.group_detr.model import GroupDetr
from tfreward.models.group_detr.options import GroupDetrOptions

__all__ = ["GroupDetr", "GroupDetrOptions"]
