"""A deliberately small detector that exercises the harness end to end (data, distribution, fit, evaluation,
export) in seconds. Not a real detector: slot k predicts the k-th ground-truth object in the pipeline's order.

Architecture: a strided conv stack, global average pooling, and a dense layer to `num_slots` slots of
(4 box logits, num_classes + 1 class logits; the last class is "no object").
Loss: L1 on sigmoid boxes (yxyx) of the slots that hold an object, normalised by the number of objects over all
replicas, plus softmax cross-entropy on every slot, normalised by the number of slots over all replicas. Both are
NaN when a logit is NaN or +-inf (`tfreward.ops.finite`).
"""

import dataclasses

import keras
import tensorflow as tf

from tfreward.models import options as checks
from tfreward.models.base import TaskModel
from tfreward.ops import boxes as box_ops
from tfreward.ops import distributed
from tfreward.ops import finite


@dataclasses.dataclass
class ToyDetectorOptions:
  """`model:` keys of the toy_detector family.

  num_slots: predictions per image; must be >= the pipeline's max_instances to see every object.
  width: channels of the first conv layer (doubled per stage, up to 4 x).
  l1_weight, ce_weight: weights of the box L1 and class cross-entropy terms.
  """
  num_slots: int = 16
  width: int = 32
  l1_weight: float = 5.0
  ce_weight: float = 1.0

  def __post_init__(self):
    checks.check_at_least(self, ("num_slots", "width"))
    checks.check_number("l1_weight", self.l1_weight, 0)
    checks.check_number("ce_weight", self.ce_weight, 0)


class ToyDetector(TaskModel):
  """Fixed-slot detector: `ToyDetector(options, *, num_classes, image_size)`; see `TaskModel`."""

  options_cls = ToyDetectorOptions
  log_names = ("loss_l1", "loss_ce")

  def __init__(self, options=None, **kwargs):
    super().__init__(options, **kwargs)
    self.num_slots = self.options.num_slots
    width = self.options.width
    # === Layers ===
    self.convs = [keras.layers.Conv2D(width * 2 ** min(i, 2), 3, strides=2, padding="same", activation="relu",
                                      name=f"conv{i}") for i in range(4)]
    self.pool = keras.layers.GlobalAveragePooling2D()
    self.head = keras.layers.Dense(self.num_slots * (4 + self.num_classes + 1), name="head")

  @property
  def loss_weights(self):
    return {"loss_l1": self.options.l1_weight, "loss_ce": self.options.ce_weight}

  def call(self, images, training=False):
    """images: [B, H, W, 3] uint8/float 0..255 -> (boxes [B, S, 4] logits, class logits [B, S, C + 1])."""
    x = tf.cast(images, self.compute_dtype) / 255.0
    for conv in self.convs:
      x = conv(x)
    out = self.head(self.pool(x))
    out = tf.reshape(tf.cast(out, tf.float32), [-1, self.num_slots, 4 + self.num_classes + 1])
    return out[..., :4], out[..., 4:]

  def compute_losses(self, images, labels, training):
    box_logits, class_logits = self(images, training=training)
    slots = min(self.num_slots, labels["boxes"].shape[1])
    valid = tf.cast(labels["valid"][:, :slots], tf.float32)  # [B, S']
    gt_boxes = tf.cast(labels["boxes"][:, :slots], tf.float32)
    l1 = tf.reduce_sum(tf.abs(tf.sigmoid(box_logits[:, :slots]) - gt_boxes), axis=-1)  # [B, S']
    num_objects = tf.maximum(distributed.global_sum(tf.reduce_sum(valid)), 1.0)
    loss_l1 = tf.reduce_sum(l1 * valid) / num_objects
    target = tf.fill(tf.shape(class_logits)[:2], self.num_classes)
    gt_classes = tf.where(labels["valid"][:, :slots], labels["classes"][:, :slots], self.num_classes)
    target = tf.concat([gt_classes, target[:, slots:]], axis=1)
    ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=target, logits=class_logits)
    num_slots_global = distributed.global_sum(tf.cast(tf.size(ce), tf.float32))
    loss_ce = tf.reduce_sum(ce) / num_slots_global
    return finite.nan_if_not_finite({"loss_l1": loss_l1, "loss_ce": loss_ce}, box_logits, class_logits)

  def detect(self, images):
    """images [B, H, W, 3] -> boxes [B, S, 4] normalised yxyx, scores [B, S], classes [B, S], num_detections [B]."""
    box_logits, class_logits = self(images, training=False)
    probs = tf.nn.softmax(class_logits, axis=-1)[..., :-1]
    boxes = box_ops.order_corners(tf.sigmoid(box_logits))
    scores = tf.reduce_max(probs, axis=-1)
    order = tf.argsort(scores, axis=-1, direction="DESCENDING")
    return {
        "boxes": tf.gather(boxes, order, batch_dims=1),
        "scores": tf.gather(scores, order, batch_dims=1),
        "classes": tf.gather(tf.argmax(probs, axis=-1, output_type=tf.int32), order, batch_dims=1),
        "num_detections": tf.fill([tf.shape(boxes)[0]], self.num_slots),
    }
