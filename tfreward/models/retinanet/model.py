"""RetinaNet (Lin et al., 2017) trained with the FreeAnchor loss (Zhang et al., 2019) or the standard RetinaNet loss.

  images [B, H, W, 3] 0..255 -> backbone (`tfreward.models.backbones.ResNet`, levels C3, C4, C5) -> FPN (P3..P7,
  strides 8..128; `layers.FPN`) -> class and box subnets (`layers.RetinaHead`) -> cls_logits [B, A, C],
  box_deltas [B, A, 4] (float32), A anchors from `tfreward.ops.anchors.retinanet_anchors` (9 per location:
  octave base scale 4, 3 scales per octave, ratios 0.5 / 1 / 2).

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

import tensorflow as tf

from tfreward.errors import ConfigError
from tfreward.losses.free_anchor import free_anchor_loss
from tfreward.losses.retinanet import retinanet_loss
from tfreward.models import options as checks
from tfreward.models.backbones import ResNet
from tfreward.models.base import TaskModel
from tfreward.models.retinanet.layers import FPN, RetinaHead
from tfreward.models.retinanet.options import BACKBONES, LOSS_TERMS, RetinaNetOptions
from tfreward.ops import anchors as anchor_ops
from tfreward.ops import box_coder
from tfreward.ops import boxes as box_ops
from tfreward.ops import nms

STRIDES = anchor_ops.RETINANET_STRIDES
WH_RATIO_CLIP = box_coder.DEFAULT_WH_RATIO_CLIP


class RetinaNet(TaskModel):
  """RetinaNet detector with the FreeAnchor or the standard RetinaNet loss:
  `RetinaNet(options, *, num_classes, image_size, clip_norm=None)`, options a `RetinaNetOptions` (or a dict of its
  fields); see `TaskModel`. num_classes: sigmoid outputs, no background class; image_size: multiples of 32.
  """

  options_cls = RetinaNetOptions

  def __init__(self, options=None, **kwargs):
    super().__init__(options, **kwargs)
    checks.check_image_size_multiple(self.image_size, 32, "RetinaNet")
    opts = self.options
    num_anchors = anchor_ops.num_anchors_per_location(scales_per_octave=opts.scales_per_octave,
                                                      aspect_ratios=opts.aspect_ratios)
    total_anchors = num_anchors * sum(h * w for h, w in anchor_ops.feature_map_sizes(self.image_size))
    if opts.pre_anchor_topk > total_anchors:
      raise ConfigError(f"model.pre_anchor_topk must be at most the {total_anchors} anchors of data.image_size "
                        f"{list(self.image_size)}, got {opts.pre_anchor_topk!r}; lower it or enlarge the images.")
    # === Layers ===
    self.backbone = ResNet(BACKBONES[opts.backbone], image_size=self.image_size, width=opts.backbone_width,
                           weights=opts.backbone_weights, sync_bn=opts.sync_bn, frozen_bn=opts.frozen_bn,
                           frozen_stages=opts.frozen_stages, name="backbone")
    self.neck = FPN(opts.fpn_channels, name="fpn")
    self.head = RetinaHead(self.num_classes, num_anchors, opts.head_convs, opts.head_channels, opts.head_group_norm,
                           name="head")

  @property
  def loss_weights(self):
    if self.options.loss == "free_anchor":
      return {"positive_bag_loss": 1.0, "negative_bag_loss": 1.0}
    return {"cls_loss": 1.0, "box_loss": self.options.bbox_weight}

  @property
  def log_names(self):
    return LOSS_TERMS[self.options.loss]

  def anchors(self):
    """[A, 4] float32 pixel xyxy anchors of the canvas (a constant of the traced step)."""
    opts = self.options
    return anchor_ops.retinanet_anchors(self.image_size, strides=STRIDES, octave_base_scale=opts.octave_base_scale,
                                        scales_per_octave=opts.scales_per_octave, aspect_ratios=opts.aspect_ratios)

  def call(self, images, training=False):
    """images [B, H, W, 3] uint8/float 0..255 -> (cls_logits [B, A, C], box_deltas [B, A, 4]), float32."""
    features = self.neck(self.backbone(images, training=training))  # C3, C4, C5 -> P3..P7
    return self.head(features)

  def compute_losses(self, images, labels, training):
    cls_logits, box_deltas = self(images, training=training)
    boxes = box_ops.denormalize_boxes(tf.cast(labels["boxes"], tf.float32), self.image_size)  # yxyx pixels
    args = (self.anchors(), cls_logits, box_deltas, box_ops.yxyx_to_xyxy(boxes), labels["classes"], labels["valid"])
    opts = self.options
    if opts.loss == "free_anchor":
      return free_anchor_loss(*args, pre_anchor_topk=opts.pre_anchor_topk, bbox_thr=opts.bbox_thr, gamma=opts.gamma,
                              alpha=opts.alpha, smoothl1_beta=opts.smoothl1_beta, loss_weight=opts.bbox_weight,
                              wh_ratio_clip=WH_RATIO_CLIP)
    return retinanet_loss(*args, pos_iou_thr=opts.pos_iou_thr, neg_iou_thr=opts.neg_iou_thr,
                          match_low_quality=opts.match_low_quality, alpha=opts.focal_alpha, gamma=opts.focal_gamma,
                          smoothl1_beta=opts.smoothl1_beta)

  def detect(self, images):
    """images [B, H, W, 3] 0..255 -> `boxes` [B, K, 4] float32 normalised yxyx of the canvas (clipped to it),
    `scores` [B, K] float32, `classes` [B, K] int32 (-1 in empty slots), `num_detections` [B] int32;
    K = max_detections."""
    cls_logits, box_deltas = self(images, training=False)
    boxes = box_coder.decode_boxes(self.anchors(), box_deltas, wh_ratio_clip=WH_RATIO_CLIP)  # [B, A, 4] xyxy px
    boxes = box_ops.clip_boxes(box_ops.normalize_boxes(box_ops.xyxy_to_yxyx(boxes), self.image_size))
    opts = self.options
    boxes, scores, classes = nms.top_class_candidates(boxes, tf.sigmoid(cls_logits), top_k=opts.pre_nms_top_k)
    return nms.class_aware_nms(boxes, scores, classes, max_detections=opts.max_detections,
                               iou_threshold=opts.nms_iou_threshold, score_threshold=opts.score_threshold,
                               pre_nms_top_k=opts.pre_nms_top_k)
