"""YOLOX (Megvii, arXiv:2107.08430): CSPDarknet + PAFPN + decoupled head, SimOTA assignment, anchor-free boxes.

  images [B, H, W, 3] 0..255 -> /255 -> CSPDarknet (C3, C4, C5) -> PAFPN (P3, P4, P5) -> decoupled head
  -> 3 raw outputs [B, H/s, W/s, 5 + C] (s = 8, 16, 32), channels (dx, dy, log_w, log_h, obj, cls...).

Training: `tfreward.losses.yolox.yolox_loss` (SimOTA, "exact" or "fast") on the labels of the data contract (boxes
normalised yxyx of the canvas, converted here to cxcywh pixels). Loss terms `iou`, `obj`, `cls`, `l1` are weighted
5, 1, 1, 1 by `loss_weights`; `num_fg_over_num_gts` is logged. The L1 term is always computed and multiplied by
the non-trainable int32 variable `l1_switch` (0 or 1) read inside the step, so switching it on never retraces.

Recipe (YOLOX's training tricks) as callbacks that `fit` adds by itself unless an instance is passed already:
`ModelEMA` (`ema=True`, see `tfreward.training.ema`) and `EnableL1LastEpochs` (`l1_last_epochs > 0`). They are
model options so that a YAML config sets them.

Inference (`detect`, also `predict_step`): decode boxes, score = sigmoid(obj) * max_c sigmoid(cls_c), class = its
argmax (as YOLOX's `postprocess`), then class-aware `tfreward.ops.nms.class_aware_nms` to fixed-size outputs.
Post-processing never runs in the train step.
"""

import dataclasses
from typing import Optional

import keras
import tensorflow as tf

from tfreward.config import ConfigError
from tfreward.errors import check_int
from tfreward.losses.yolox import yolox_loss
from tfreward.models import yolox_layers
from tfreward.models import options as checks
from tfreward.models.base import TaskModel
from tfreward.ops import boxes as box_ops
from tfreward.ops import nms
from tfreward.ops import yolox_grid
from tfreward.training.ema import ModelEMA

# size: (depth multiplier, width multiplier, depthwise convolutions), as in the YOLOX exps.
SIZES = {"nano": (0.33, 0.25, True), "tiny": (0.33, 0.375, False), "s": (0.33, 0.5, False),
         "m": (0.67, 0.75, False), "l": (1.0, 1.0, False), "x": (1.33, 1.25, False)}
STRIDES = (8, 16, 32)
DEFAULT_LOSS_WEIGHTS = {"iou": 5.0, "obj": 1.0, "cls": 1.0, "l1": 1.0}


@dataclasses.dataclass
class YoloxOptions:
  """`model:` keys of the yolox family. The multipliers and `depthwise` override the `size` preset."""
  size: str = "s"  # nano, tiny, s, m, l, x
  depth_multiplier: Optional[float] = None
  width_multiplier: Optional[float] = None
  depthwise: Optional[bool] = None
  sync_bn: bool = True  # batch statistics over all replicas
  iou_type: str = "iou"  # "iou" (1 - IoU^2) or "giou"
  assigner: str = "exact"  # SimOTA variant: "exact" or "fast"
  iou_weight: float = 5.0
  l1_last_epochs: int = 0  # L1 loss on for the last N epochs (YOLOX: 15)
  ema: bool = True
  ema_decay: float = 0.9998
  ema_ramp_updates: float = 2000.0
  score_threshold: float = 0.01
  nms_iou_threshold: float = 0.65
  max_detections: int = 100
  pre_nms_top_k: int = 1000

  def __post_init__(self):
    checks.check_choice("size", self.size, SIZES)
    for name in ("depth_multiplier", "width_multiplier"):
      if getattr(self, name) is not None and getattr(self, name) <= 0:
        raise ConfigError(f"model.{name} must be positive, got {getattr(self, name)!r}.")
    checks.check_choice("iou_type", self.iou_type, ("iou", "giou"))
    checks.check_choice("assigner", self.assigner, ("exact", "fast"))
    checks.check_at_least(self, ("l1_last_epochs",), 0)
    checks.check_at_least(self, ("max_detections", "pre_nms_top_k"))


class EnableL1LastEpochs(keras.callbacks.Callback):
  """Sets `model.l1_switch` to 1 from epoch `epochs - last_epochs` on (0 before), at the start of each epoch."""

  def __init__(self, last_epochs):
    super().__init__()
    check_int("last_epochs", last_epochs, minimum=0)
    self.last_epochs = last_epochs

  def on_epoch_begin(self, epoch, logs=None):
    epochs = (self.params or {}).get("epochs") or 0
    self.model.l1_switch.assign(1 if self.last_epochs and epoch >= epochs - self.last_epochs else 0)


class YoloxModel(TaskModel):
  """YOLOX detector.

  Args:
    num_classes: int. Object classes.
    depth_multiplier: float. Scales the number of CSP blocks. Defaults to 0.33 (YOLOX-s).
    width_multiplier: float. Scales the channels. Defaults to 0.5 (YOLOX-s).
    depthwise: bool. Depthwise-separable 3x3 convolutions (YOLOX-nano). Defaults to False.
    image_size: (int, int). Canvas height and width, multiples of 32. Defaults to (640, 640).
    sync_bn: bool. Batch statistics over all replicas. Defaults to True.
    iou_type: str. "iou" or "giou" box loss. Defaults to "iou".
    assigner: str. SimOTA variant, "exact" or "fast". Defaults to "exact".
    l1_last_epochs: int. `fit` switches the L1 loss on for the last N epochs. Defaults to 0 (never).
    ema: bool. `fit` keeps an EMA of the weights (`ModelEMA`). Defaults to False.
    ema_decay, ema_ramp_updates: float. EMA decay and ramp. Default to 0.9998 and 2000.
    score_threshold, nms_iou_threshold: float. Detection score threshold and NMS IoU. Default to 0.01, 0.65.
    max_detections, pre_nms_top_k: int. Output slots K and candidates entering NMS. Default to 100, 1000.
    loss_weights: dict. Weights of `iou`, `obj`, `cls`, `l1`. Defaults to 5, 1, 1, 1.
    clip_norm: float or None. See `TaskModel`.
  """

  log_names = ("iou", "obj", "cls", "l1", "num_fg_over_num_gts")

  def __init__(self, *, num_classes, depth_multiplier=0.33, width_multiplier=0.5, depthwise=False,
               image_size=(640, 640), sync_bn=True, iou_type="iou", assigner="exact", l1_last_epochs=0, ema=False,
               ema_decay=0.9998, ema_ramp_updates=2000.0, score_threshold=0.01, nms_iou_threshold=0.65,
               max_detections=100, pre_nms_top_k=1000, loss_weights=None, **kwargs):
    super().__init__(image_size=image_size, loss_weights=loss_weights or DEFAULT_LOSS_WEIGHTS, **kwargs)
    if any(s % STRIDES[-1] for s in self.image_size):
      raise ValueError(f"image_size must be multiples of {STRIDES[-1]}, got {image_size!r}.")
    check_int("num_classes", num_classes)
    if iou_type not in ("iou", "giou") or assigner not in ("exact", "fast"):
      raise ValueError(f"iou_type must be 'iou' or 'giou' and assigner 'exact' or 'fast', got {iou_type!r}, "
                       f"{assigner!r}.")
    self.num_classes = num_classes
    self.depth_multiplier, self.width_multiplier = float(depth_multiplier), float(width_multiplier)
    self.depthwise, self.sync_bn = bool(depthwise), bool(sync_bn)
    self.iou_type, self.assigner = iou_type, assigner
    self.l1_last_epochs = int(l1_last_epochs)
    self.ema, self.ema_decay, self.ema_ramp_updates = bool(ema), float(ema_decay), float(ema_ramp_updates)
    self.score_threshold, self.nms_iou_threshold = float(score_threshold), float(nms_iou_threshold)
    self.max_detections, self.pre_nms_top_k = int(max_detections), int(pre_nms_top_k)
    arch = dict(depth=self.depth_multiplier, width=self.width_multiplier, depthwise=self.depthwise,
                sync_bn=self.sync_bn)
    # === Layers ===
    self.backbone = yolox_layers.CSPDarknet(name="backbone", **arch)
    self.neck = yolox_layers.PAFPN(name="neck", **arch)
    self.head = yolox_layers.DecoupledHead(num_classes, len(STRIDES), self.width_multiplier, self.depthwise,
                                           self.sync_bn, name="head")
    # === State ===
    self.l1_switch = self.add_weight(shape=(), dtype="int32", initializer="zeros", trainable=False,
                                     name="l1_switch")

  def call(self, images, training=False):
    """images [B, H, W, 3] uint8/float 0..255 -> list of 3 raw outputs [B, H/s, W/s, 5 + C] float32."""
    x = tf.cast(images, self.compute_dtype) / 255.0
    return self.head(self.neck(self.backbone(x, training=training), training=training), training=training)

  def compute_losses(self, images, labels, training):
    outputs = self(images, training=training)
    boxes = box_ops.denormalize_boxes(tf.cast(labels["boxes"], tf.float32), self.image_size)  # yxyx pixels
    loss = yolox_loss(outputs, box_ops.yxyx_to_cxcywh(boxes), labels["classes"], labels["valid"], strides=STRIDES,
                      num_classes=self.num_classes, use_l1=True, iou_type=self.iou_type, variant=self.assigner)
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
    return nms.class_aware_nms(boxes, tf.reduce_max(probs, axis=-1), tf.argmax(probs, axis=-1, output_type=tf.int32),
                               max_detections=self.max_detections, iou_threshold=self.nms_iou_threshold,
                               score_threshold=self.score_threshold, pre_nms_top_k=self.pre_nms_top_k)

  # === Recipe callbacks ===

  def recipe_callbacks(self, existing=()):
    """The callbacks of the YOLOX recipe that `existing` does not already hold (EMA, L1 for the last epochs)."""
    callbacks = []
    if self.ema and not any(isinstance(c, ModelEMA) for c in existing):
      callbacks.append(ModelEMA(decay=self.ema_decay, ramp_updates=self.ema_ramp_updates))
    if self.l1_last_epochs and not any(isinstance(c, EnableL1LastEpochs) for c in existing):
      callbacks.append(EnableL1LastEpochs(self.l1_last_epochs))
    return callbacks

  # === Config ===

  def get_config(self):
    config = super().get_config()
    config.update(num_classes=self.num_classes, depth_multiplier=self.depth_multiplier,
                  width_multiplier=self.width_multiplier, depthwise=self.depthwise, sync_bn=self.sync_bn,
                  iou_type=self.iou_type, assigner=self.assigner, l1_last_epochs=self.l1_last_epochs, ema=self.ema,
                  ema_decay=self.ema_decay, ema_ramp_updates=self.ema_ramp_updates,
                  score_threshold=self.score_threshold, nms_iou_threshold=self.nms_iou_threshold,
                  max_detections=self.max_detections, pre_nms_top_k=self.pre_nms_top_k)
    return config


def build(options: YoloxOptions, *, num_classes, image_size, clip_norm=None):
  depth, width, depthwise = SIZES[options.size]
  return YoloxModel(
      num_classes=num_classes, image_size=image_size, clip_norm=clip_norm,
      depth_multiplier=options.depth_multiplier or depth, width_multiplier=options.width_multiplier or width,
      depthwise=depthwise if options.depthwise is None else options.depthwise, sync_bn=options.sync_bn,
      iou_type=options.iou_type, assigner=options.assigner, l1_last_epochs=options.l1_last_epochs, ema=options.ema,
      ema_decay=options.ema_decay, ema_ramp_updates=options.ema_ramp_updates,
      score_threshold=options.score_threshold, nms_iou_threshold=options.nms_iou_threshold,
      max_detections=options.max_detections, pre_nms_top_k=options.pre_nms_top_k,
      loss_weights={**DEFAULT_LOSS_WEIGHTS, "iou": options.iou_weight})
