"""RetinaNet (Lin et al., 2017) trained with the FreeAnchor loss (Zhang et al., 2019) or the standard RetinaNet loss.

  images [B, H, W, 3] 0..255 -> backbone (C3, C4, C5) -> FPN (P3..P7, strides 8..128) -> class and box subnets
  -> cls_logits [B, A, C], box_deltas [B, A, 4] (float32), A anchors from `tfreward.ops.anchors.retinanet_anchors`
  (9 per location: octave base scale 4, 3 scales per octave, ratios 0.5 / 1 / 2).

Training (`compute_losses`): the labels of the data contract (boxes normalised yxyx of the canvas) become pixel
xyxy, then
  loss="free_anchor" (default): `tfreward.losses.free_anchor.free_anchor_loss`, terms `positive_bag_loss` and
    `negative_bag_loss` (weights 1 and 1; mmdetection's 0.75 SmoothL1 weight acts inside P_loc);
  loss="retinanet" (the baseline): `tfreward.losses.retinanet.retinanet_loss` (IoU >= 0.5 positive, < 0.4
    negative, focal loss, smooth L1), terms `cls_loss` and `box_loss` (weights 1 and `bbox_loss_weight`).
Each term is this replica's share, normalised over the global batch.

Inference (`detect`, also `predict_step`; never in the train step): boxes decoded with the delta coder and
clipped to the canvas, per-class sigmoid scores, the `pre_nms_top_k` best (anchor, class) pairs of each image
(`tfreward.ops.nms.top_class_candidates`), then class-aware NMS to `max_detections` fixed slots
(`tfreward.ops.nms.class_aware_nms`). mmdetection instead keeps the 1000 best anchors per level by their best
class; both feed a multi-label, class-aware NMS.
"""

import dataclasses
from typing import Optional

import tensorflow as tf

from tfreward.config import ConfigError
from tfreward.errors import check_int
from tfreward.losses.free_anchor import free_anchor_loss
from tfreward.losses.retinanet import retinanet_loss
from tfreward.models import retinanet_layers
from tfreward.models import options as checks
from tfreward.models.base import TaskModel
from tfreward.ops import anchors as anchor_ops
from tfreward.ops import box_coder
from tfreward.ops import boxes as box_ops
from tfreward.ops import nms

LOSSES = ("free_anchor", "retinanet")
LOSS_TERMS = {"free_anchor": ("positive_bag_loss", "negative_bag_loss"), "retinanet": ("cls_loss", "box_loss")}
DEFAULT_BBOX_LOSS_WEIGHT = {"free_anchor": 0.75, "retinanet": 1.0}
STRIDES = anchor_ops.RETINANET_STRIDES
WH_RATIO_CLIP = box_coder.DEFAULT_WH_RATIO_CLIP


@dataclasses.dataclass
class RetinaNetOptions:
  """`model:` keys of the retinanet family (see `RetinaNet` for their meaning)."""
  loss: str = "free_anchor"  # "free_anchor" or "retinanet" (the baseline)
  backbone: str = "small_resnet"  # "small_resnet" or "resnet50"
  backbone_weights: Optional[str] = None  # resnet50: None or "imagenet"
  backbone_width: int = 32  # small_resnet: channels of the first stage
  backbone_depth: int = 1  # small_resnet: basic blocks per stage
  sync_bn: bool = True
  frozen_bn: bool = False
  frozen_stages: int = 0  # resnet50
  fpn_channels: int = 256
  head_convs: int = 4
  head_channels: int = 256
  head_group_norm: bool = False  # GroupNorm in the subnets (FCOS / ATSS style); RetinaNet has none
  octave_base_scale: float = 4.0
  scales_per_octave: int = 3
  aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
  smoothl1_beta: float = 0.11
  bbox_loss_weight: Optional[float] = None  # None: 0.75 for free_anchor, 1.0 for retinanet
  pre_anchor_topk: int = 50  # free_anchor
  bbox_thr: float = 0.6  # free_anchor
  gamma: float = 2.0  # free_anchor
  alpha: float = 0.5  # free_anchor
  pos_iou_thr: float = 0.5  # retinanet
  neg_iou_thr: float = 0.4  # retinanet
  match_low_quality: bool = True  # retinanet
  focal_alpha: float = 0.25  # retinanet
  focal_gamma: float = 2.0  # retinanet
  score_threshold: float = 0.05
  nms_iou_threshold: float = 0.5
  max_detections: int = 100
  pre_nms_top_k: int = 1000

  def __post_init__(self):
    checks.check_choice("loss", self.loss, LOSSES)
    checks.check_choice("backbone", self.backbone, retinanet_layers.BACKBONES)
    checks.check_backbone_weights(self.backbone_weights, self.backbone)
    checks.check_at_least(self, ("backbone_width", "backbone_depth", "fpn_channels", "head_channels",
                                 "scales_per_octave", "pre_anchor_topk", "max_detections", "pre_nms_top_k"))
    if self.head_convs < 0 or not 0 <= self.frozen_stages <= 4:
      raise ConfigError(f"model.head_convs must be >= 0 and model.frozen_stages in [0, 4], got "
                        f"{self.head_convs!r} and {self.frozen_stages!r}.")
    if not self.aspect_ratios or any(r <= 0 for r in self.aspect_ratios) or self.octave_base_scale <= 0:
      raise ConfigError(f"model.aspect_ratios and model.octave_base_scale must be positive, got "
                        f"{list(self.aspect_ratios)!r} and {self.octave_base_scale!r}.")


class RetinaNet(TaskModel):
  """RetinaNet detector with the FreeAnchor or the standard RetinaNet loss.

  Args:
    num_classes: int. Object classes (sigmoid outputs, no background class).
    image_size: (int, int). Canvas height and width, multiples of 32. Defaults to (1024, 1024).
    loss: str. "free_anchor" or "retinanet". Defaults to "free_anchor".
    backbone: str. "small_resnet" or "resnet50". Defaults to "small_resnet".
    backbone_weights: None or "imagenet" (resnet50 only). Defaults to None.
    backbone_width, backbone_depth: int. small_resnet first-stage channels and blocks per stage. Default 32, 1.
    sync_bn: bool. Batch statistics over all replicas. Defaults to True.
    frozen_bn: bool. Frozen batch normalisation (mmdetection's ResNet recipe). Defaults to False.
    frozen_stages: int. resnet50: stem and first stages not trained. Defaults to 0.
    fpn_channels: int. FPN channels. Defaults to 256.
    head_convs, head_channels: int. Convs per subnet and their channels. Default 4, 256.
    head_group_norm: bool. GroupNorm after each subnet conv (not in RetinaNet). Defaults to False.
    octave_base_scale, scales_per_octave, aspect_ratios: anchor shapes. Default 4, 3, (0.5, 1, 2).
    smoothl1_beta: float. SmoothL1 beta of either loss. Defaults to 0.11.
    bbox_loss_weight: float or None. free_anchor: the weight inside P_loc (default 0.75); retinanet: the weight of
      `box_loss` in the total (default 1.0).
    pre_anchor_topk, bbox_thr, gamma, alpha: FreeAnchor's bag size, box-probability threshold, negative focal
      exponent and positive weight. Default 50, 0.6, 2.0, 0.5.
    pos_iou_thr, neg_iou_thr, match_low_quality, focal_alpha, focal_gamma: the RetinaNet loss. Default 0.5, 0.4,
      True, 0.25, 2.0.
    score_threshold, nms_iou_threshold: detection score threshold and NMS IoU. Default 0.05, 0.5.
    max_detections, pre_nms_top_k: output slots K and (anchor, class) candidates entering NMS. Default 100, 1000.
    loss_weights: dict or None. Overrides the weights of the loss terms.
    clip_norm: float or None. See `TaskModel`.
  """

  def __init__(self, *, num_classes, image_size=(1024, 1024), loss="free_anchor", backbone="small_resnet",
               backbone_weights=None, backbone_width=32, backbone_depth=1, sync_bn=True, frozen_bn=False,
               frozen_stages=0, fpn_channels=256, head_convs=4, head_channels=256, head_group_norm=False,
               octave_base_scale=4.0, scales_per_octave=3, aspect_ratios=(0.5, 1.0, 2.0), smoothl1_beta=0.11,
               bbox_loss_weight=None,
               pre_anchor_topk=50, bbox_thr=0.6, gamma=2.0, alpha=0.5, pos_iou_thr=0.5, neg_iou_thr=0.4,
               match_low_quality=True, focal_alpha=0.25, focal_gamma=2.0, score_threshold=0.05,
               nms_iou_threshold=0.5, max_detections=100, pre_nms_top_k=1000, loss_weights=None, **kwargs):
    if loss not in LOSSES:
      raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}.")
    check_int("num_classes", num_classes)
    self.loss_type = loss  # read by `log_names` in TaskModel.__init__
    bbox_loss_weight = DEFAULT_BBOX_LOSS_WEIGHT[loss] if bbox_loss_weight is None else float(bbox_loss_weight)
    if loss_weights is None:
      loss_weights = ({"positive_bag_loss": 1.0, "negative_bag_loss": 1.0} if loss == "free_anchor" else
                      {"cls_loss": 1.0, "box_loss": bbox_loss_weight})
    super().__init__(image_size=image_size, loss_weights=loss_weights, **kwargs)
    if any(s % 32 for s in self.image_size):
      raise ValueError(f"image_size must be multiples of 32, got {image_size!r}.")
    self.num_classes = num_classes
    self.backbone_name, self.backbone_weights = backbone, backbone_weights
    self.backbone_width, self.backbone_depth = int(backbone_width), int(backbone_depth)
    self.sync_bn, self.frozen_bn, self.frozen_stages = bool(sync_bn), bool(frozen_bn), int(frozen_stages)
    self.fpn_channels, self.head_convs, self.head_channels = int(fpn_channels), int(head_convs), int(head_channels)
    self.head_group_norm = bool(head_group_norm)
    self.octave_base_scale, self.scales_per_octave = float(octave_base_scale), int(scales_per_octave)
    self.aspect_ratios = tuple(float(r) for r in aspect_ratios)
    self.smoothl1_beta, self.bbox_loss_weight = float(smoothl1_beta), bbox_loss_weight
    self.pre_anchor_topk, self.bbox_thr, self.gamma, self.alpha = int(pre_anchor_topk), bbox_thr, gamma, alpha
    self.pos_iou_thr, self.neg_iou_thr, self.match_low_quality = pos_iou_thr, neg_iou_thr, bool(match_low_quality)
    self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
    self.score_threshold, self.nms_iou_threshold = float(score_threshold), float(nms_iou_threshold)
    self.max_detections, self.pre_nms_top_k = int(max_detections), int(pre_nms_top_k)
    num_anchors = anchor_ops.num_anchors_per_location(scales_per_octave=self.scales_per_octave,
                                                      aspect_ratios=self.aspect_ratios)
    total_anchors = num_anchors * sum(h * w for h, w in anchor_ops.feature_map_sizes(self.image_size))
    if self.pre_anchor_topk > total_anchors:
      raise ValueError(f"pre_anchor_topk must be at most the {total_anchors} anchors of image_size "
                       f"{self.image_size}, got {pre_anchor_topk!r}.")
    # === Layers ===
    self.backbone = retinanet_layers.build_backbone(
        backbone, image_size=self.image_size, weights=backbone_weights, width=self.backbone_width,
        depth=self.backbone_depth, sync_bn=self.sync_bn, frozen_bn=self.frozen_bn, frozen_stages=self.frozen_stages)
    self.neck = retinanet_layers.FPN(self.fpn_channels, name="fpn")
    self.head = retinanet_layers.RetinaHead(num_classes, num_anchors, self.head_convs, self.head_channels,
                                            self.head_group_norm, name="head")

  @property
  def log_names(self):
    return LOSS_TERMS[self.loss_type]

  def anchors(self):
    """[A, 4] float32 pixel xyxy anchors of the canvas (a constant of the traced step)."""
    return anchor_ops.retinanet_anchors(self.image_size, strides=STRIDES, octave_base_scale=self.octave_base_scale,
                                        scales_per_octave=self.scales_per_octave, aspect_ratios=self.aspect_ratios)

  def call(self, images, training=False):
    """images [B, H, W, 3] uint8/float 0..255 -> (cls_logits [B, A, C], box_deltas [B, A, 4]), float32."""
    features = self.neck(self.backbone(images, training=training))
    return self.head(features)

  def compute_losses(self, images, labels, training):
    cls_logits, box_deltas = self(images, training=training)
    boxes = box_ops.denormalize_boxes(tf.cast(labels["boxes"], tf.float32), self.image_size)  # yxyx pixels
    args = (self.anchors(), cls_logits, box_deltas, box_ops.yxyx_to_xyxy(boxes), labels["classes"], labels["valid"])
    if self.loss_type == "free_anchor":
      return free_anchor_loss(*args, pre_anchor_topk=self.pre_anchor_topk, bbox_thr=self.bbox_thr, gamma=self.gamma,
                              alpha=self.alpha, smoothl1_beta=self.smoothl1_beta, loss_weight=self.bbox_loss_weight,
                              wh_ratio_clip=WH_RATIO_CLIP)
    return retinanet_loss(*args, pos_iou_thr=self.pos_iou_thr, neg_iou_thr=self.neg_iou_thr,
                          match_low_quality=self.match_low_quality, alpha=self.focal_alpha, gamma=self.focal_gamma,
                          smoothl1_beta=self.smoothl1_beta)

  def detect(self, images):
    """images [B, H, W, 3] 0..255 -> `boxes` [B, K, 4] float32 normalised yxyx of the canvas (clipped to it),
    `scores` [B, K] float32, `classes` [B, K] int32 (-1 in empty slots), `num_detections` [B] int32;
    K = max_detections."""
    cls_logits, box_deltas = self(images, training=False)
    boxes = box_coder.decode_boxes(self.anchors(), box_deltas, wh_ratio_clip=WH_RATIO_CLIP)  # [B, A, 4] xyxy px
    boxes = box_ops.clip_boxes(box_ops.normalize_boxes(box_ops.xyxy_to_yxyx(boxes), self.image_size))
    boxes, scores, classes = nms.top_class_candidates(boxes, tf.sigmoid(cls_logits), top_k=self.pre_nms_top_k)
    return nms.class_aware_nms(boxes, scores, classes, max_detections=self.max_detections,
                               iou_threshold=self.nms_iou_threshold, score_threshold=self.score_threshold,
                               pre_nms_top_k=self.pre_nms_top_k)

  # === Config ===

  def get_config(self):
    config = super().get_config()
    config.update(
        num_classes=self.num_classes, loss=self.loss_type, backbone=self.backbone_name,
        backbone_weights=self.backbone_weights, backbone_width=self.backbone_width,
        backbone_depth=self.backbone_depth, sync_bn=self.sync_bn, frozen_bn=self.frozen_bn,
        frozen_stages=self.frozen_stages, fpn_channels=self.fpn_channels, head_convs=self.head_convs,
        head_channels=self.head_channels, head_group_norm=self.head_group_norm,
        octave_base_scale=self.octave_base_scale, scales_per_octave=self.scales_per_octave,
        aspect_ratios=list(self.aspect_ratios),
        smoothl1_beta=self.smoothl1_beta, bbox_loss_weight=self.bbox_loss_weight,
        pre_anchor_topk=self.pre_anchor_topk, bbox_thr=self.bbox_thr, gamma=self.gamma, alpha=self.alpha,
        pos_iou_thr=self.pos_iou_thr, neg_iou_thr=self.neg_iou_thr, match_low_quality=self.match_low_quality,
        focal_alpha=self.focal_alpha, focal_gamma=self.focal_gamma, score_threshold=self.score_threshold,
        nms_iou_threshold=self.nms_iou_threshold, max_detections=self.max_detections,
        pre_nms_top_k=self.pre_nms_top_k)
    return config


def build(options: RetinaNetOptions, *, num_classes, image_size, clip_norm=None):
  return RetinaNet(**dataclasses.asdict(options), num_classes=num_classes, image_size=image_size,
                   clip_norm=clip_norm)
