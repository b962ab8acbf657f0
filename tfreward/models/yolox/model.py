"""YOLOX (Megvii, arXiv:2107.08430): CSPDarknet + PAFPN + decoupled head, SimOTA assignment, anchor-free boxes.

  images [B, H, W, 3] 0..255 -> /255 -> CSPDarknet (C3, C4, C5) -> PAFPN (P3, P4, P5) -> decoupled head
  -> 3 raw outputs [B, H/s, W/s, 5 + C] (s = 8, 16, 32), channels (dx, dy, log_w, log_h, obj, cls...).

Training: `tfreward.losses.yolox.yolox_loss` (SimOTA, "exact" or "fast") on the labels of the data contract (boxes
normalised yxyx of the canvas, converted here to cxcywh pixels). Loss terms `iou`, `obj`, `cls`, `l1` are weighted
`iou_weight`, 1, 1, 1 by `loss_weights`; `num_fg_over_num_gts` is logged. The L1 term is always computed and
multiplied by the non-trainable int32 variable `l1_switch` (0 or 1) read inside the step, so switching it on never
retraces.

Recipe (YOLOX's training tricks), named by `recipe_callbacks` and built by the trainer
(`tfreward.training.recipes`): "ema" (`ema=True`) and "l1_last_epochs" (`l1_last_epochs > 0`, sets `l1_switch`).

Inference (`detect`, also `predict_step`): decode boxes, score = sigmoid(obj) * max_c sigmoid(cls_c), class = its
argmax (as YOLOX's `postprocess`), then class-aware `tfreward.ops.nms.class_aware_nms` to fixed-size outputs.
Post-processing never runs in the train step.
"""

import tensorflow as tf

from tfreward.losses.yolox import yolox_loss
from tfreward.models import options as checks
from tfreward.models.base import RecipeCallback, TaskModel
from tfreward.models.yolox import layers
from tfreward.models.yolox.options import SIZES, YoloxOptions
from tfreward.ops import boxes as box_ops
from tfreward.ops import nms
from tfreward.ops import yolox_grid

STRIDES = (8, 16, 32)


class Yolox(TaskModel):
  """YOLOX detector: `Yolox(options, *, num_classes, image_size, clip_norm=None)`; see `TaskModel`.

  `options` is a `YoloxOptions` (or a dict of its fields); the `size` preset and its overrides resolve here into
  `depth_multiplier`, `width_multiplier` and `depthwise`. `image_size` must be multiples of 32.
  """

  options_cls = YoloxOptions
  log_names = ("iou", "obj", "cls", "l1", "num_fg_over_num_gts")

  def __init__(self, options=None, **kwargs):
    super().__init__(options, **kwargs)
    checks.check_image_size_multiple(self.image_size, STRIDES[-1], "yolox")
    options = self.options
    depth, width, depthwise = SIZES[options.size]
    self.depth_multiplier = float(depth if options.depth_multiplier is None else options.depth_multiplier)
    self.width_multiplier = float(width if options.width_multiplier is None else options.width_multiplier)
    self.depthwise = bool(depthwise if options.depthwise is None else options.depthwise)
    arch = dict(depth=self.depth_multiplier, width=self.width_multiplier, depthwise=self.depthwise,
                sync_bn=options.sync_bn)
    # === Layers ===
    self.backbone = layers.CSPDarknet(name="backbone", **arch)
    self.neck = layers.PAFPN(name="neck", **arch)
    self.head = layers.DecoupledHead(self.num_classes, len(STRIDES), self.width_multiplier, self.depthwise,
                                     options.sync_bn, name="head")
    # === State ===
    self.l1_switch = self.add_weight(shape=(), dtype="int32", initializer="zeros", trainable=False,
                                     name="l1_switch")

  @property
  def loss_weights(self):
    return {"iou": self.options.iou_weight, "obj": 1.0, "cls": 1.0, "l1": 1.0}

  def call(self, images, training=False):
    """images [B, H, W, 3] uint8/float 0..255 -> list of 3 raw outputs [B, H/s, W/s, 5 + C] float32."""
    x = tf.cast(images, self.compute_dtype) / 255.0
    return self.head(self.neck(self.backbone(x, training=training), training=training), training=training)

  def compute_losses(self, images, labels, training):
    outputs = self(images, training=training)
    boxes = box_ops.denormalize_boxes(tf.cast(labels["boxes"], tf.float32), self.image_size)  # yxyx pixels
    loss = yolox_loss(outputs, box_ops.yxyx_to_cxcywh(boxes), labels["classes"], labels["valid"], strides=STRIDES,
                      num_classes=self.num_classes, use_l1=True, iou_type=self.options.iou_type,
                      variant=self.options.assigner)
    l1_on = tf.cast(tf.convert_to_tensor(self.l1_switch) > 0, tf.float32)
    return {"iou": loss["iou"], "obj": loss["obj"], "cls": loss["cls"], "l1": loss["l1"] * l1_on,
            "num_fg_over_num_gts": loss["num_fg_over_num_gts"]}

  def detect(self, images):
    """images [B, H, W, 3] 0..255 -> `postprocess` of the raw outputs."""
    return self.postprocess(self(images, training=False))

  def postprocess(self, outputs):
    """Raw head outputs (list of [B, H/s, W/s, 5 + C]) -> `boxes` [B, K, 4] float32 normalised yxyx of the canvas
    (clipped to it), `scores` [B, K] float32, `classes` [B, K] int32 (-1 in empty slots), `num_detections` [B]
    int32; K = max_detections."""
    grid_xy, anchor_strides = yolox_grid.anchor_grid(outputs, STRIDES)  # [A, 2], [A]
    raw = tf.cast(yolox_grid.flatten_levels(outputs), tf.float32)  # [B, A, 5 + C]
    boxes = yolox_grid.decode_boxes(raw[..., :4], grid_xy, anchor_strides)  # [B, A, 4] cxcywh pixels
    boxes = box_ops.clip_boxes(box_ops.normalize_boxes(box_ops.cxcywh_to_yxyx(boxes), self.image_size))
    probs = tf.sigmoid(raw[..., 5:]) * tf.sigmoid(raw[..., 4:5])  # [B, A, C]
    options = self.options
    return nms.class_aware_nms(boxes, tf.reduce_max(probs, axis=-1), tf.argmax(probs, axis=-1, output_type=tf.int32),
                               max_detections=options.max_detections, iou_threshold=options.nms_iou_threshold,
                               score_threshold=options.score_threshold, pre_nms_top_k=options.pre_nms_top_k)

  def recipe_callbacks(self):
    """The YOLOX recipe: an EMA of the weights (`ema`) and the L1 loss for the last epochs (`l1_last_epochs`)."""
    callbacks = []
    if self.options.ema:
      callbacks.append(RecipeCallback("ema", {"decay": self.options.ema_decay,
                                              "ramp_updates": self.options.ema_ramp_updates}))
    if self.options.l1_last_epochs:
      callbacks.append(RecipeCallback("l1_last_epochs", {"last_epochs": self.options.l1_last_epochs}))
    return callbacks
