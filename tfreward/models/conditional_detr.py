"""Conditional DETR (Meng et al., 2021) trained with Group DETR's group-wise one-to-many assignment (Chen et al., 2022).

  images [B, H, W, 3] 0..255 -> backbone -> 1x1 conv to D -> + sine positions -> transformer encoder -> memory
  query embeddings [G*Q, D] (training; the first Q at inference) -> conditional decoder (`detr_layers`)
  -> per decoder layer: class logits [B, N, C] (sigmoid, prior 0.01) and boxes [B, N, 4] normalised cxcywh,
     sigmoid(MLP(h) + (inverse_sigmoid(reference), 0, 0)).

Training (`compute_losses`): the labels of the data contract (boxes normalised yxyx of the canvas) become normalised
cxcywh and go to `tfreward.losses.detr.group_detr_loss` with G groups: each group of Q queries is matched one-to-one
to the objects on its own (exact Hungarian matching inside the step), so every object has G positive queries.
Terms `loss_ce`, `loss_bbox`, `loss_giou` (and `_k` for decoder layer k < L - 1, the auxiliary losses) weighted
2, 5, 2; `class_error` and `cardinality_error` are logged. Self-attention in the decoder stays within a group, so
at inference the first group alone is an ordinary Conditional DETR: prediction costs nothing extra.
Evaluation losses (`test_step`) use that first group, like the reference.

Inference (`detect`, also `predict_step`): no NMS; the `max_detections` best (query, class) pairs by sigmoid score
of the first group, fixed size (slots beyond the Q * C pairs are padding: box 0, score 0, class -1).

Backbone learning rate: the reference trains the backbone at lr 1e-5 and the rest at 1e-4 (two parameter groups).
Scaling backbone gradients cannot do that with Adam (its step ignores the gradient scale), so `train_step` scales
the backbone's *update* instead: after the optimizer step each backbone variable is moved back to
`old + backbone_lr_multiplier * (new - old)`. AdamW's and SGD's updates, decoupled weight decay included, are
linear in the learning rate, so this is exactly a backbone learning rate of multiplier x lr.
"""

import dataclasses
from typing import Optional

import keras
import tensorflow as tf

from tfreward.config import ConfigError
from tfreward.errors import check_int
from tfreward.losses.detr import group_detr_loss
from tfreward.models import detr_layers
from tfreward.models import options as checks
from tfreward.models.base import TaskModel
from tfreward.ops import boxes as box_ops

TERMS = ("loss_ce", "loss_bbox", "loss_giou")


@dataclasses.dataclass
class GroupDetrOptions:
  """`model:` keys of the group_detr family; defaults are Conditional DETR R50 with Group DETR's 11 groups."""
  backbone: str = "resnet50"  # "resnet50" or "small_cnn"
  backbone_weights: Optional[str] = None  # resnet50: null or "imagenet"
  backbone_width: int = 32  # small_cnn: channels of the first stage
  backbone_stages: int = 4  # small_cnn: stride 2**stages
  backbone_lr_multiplier: float = 0.1  # backbone lr / lr (reference: 1e-5 / 1e-4)
  hidden_dim: int = 256
  num_heads: int = 8
  encoder_layers: int = 6
  decoder_layers: int = 6
  ffn_dim: int = 2048
  dropout: float = 0.1
  num_queries: int = 300  # per group; must be >= data.max_instances
  num_groups: int = 11
  aux_loss: bool = True
  cls_loss_weight: float = 2.0
  bbox_loss_weight: float = 5.0
  giou_loss_weight: float = 2.0
  cost_class: float = 2.0
  cost_bbox: float = 5.0
  cost_giou: float = 2.0
  focal_alpha: float = 0.25
  max_detections: int = 100

  def __post_init__(self):
    checks.check_choice("backbone", self.backbone, detr_layers.BACKBONES)
    checks.check_backbone_weights(self.backbone_weights, self.backbone)
    checks.check_at_least(self, ("encoder_layers",), 0)
    checks.check_at_least(self, ("backbone_width", "backbone_stages", "hidden_dim", "num_heads", "decoder_layers",
                                 "ffn_dim", "num_queries", "num_groups", "max_detections"))
    if self.hidden_dim % (2 * self.num_heads):
      raise ConfigError(f"model.hidden_dim must be a multiple of 2 * model.num_heads, got {self.hidden_dim!r} and "
                        f"{self.num_heads!r}.")
    if not 0.0 <= self.dropout < 1.0 or self.backbone_lr_multiplier < 0.0:
      raise ConfigError(f"model.dropout must be in [0, 1) and model.backbone_lr_multiplier >= 0, got "
                        f"{self.dropout!r} and {self.backbone_lr_multiplier!r}.")


def _scale_updates(variables, before, multiplier):
  """Moves each variable to `before + multiplier * (now - before)`, in cross-replica context like an optimizer."""
  def update(distribution, variables, before):
    for var, old in zip(variables, before):
      distribution.extended.update(var, lambda v, o: v.assign(o + multiplier * (v - o)), args=(old,), group=False)
  tf.__internal__.distribute.interim.maybe_merge_call(update, tf.distribute.get_strategy(), variables, before)


class ConditionalDetr(TaskModel):
  """Conditional DETR with Group DETR training.

  Args:
    num_classes: int. Object classes C (sigmoid outputs, no "no object" class).
    image_size: (int, int). Canvas height and width. Defaults to (800, 800).
    backbone: str. "resnet50" or "small_cnn". Defaults to "resnet50".
    backbone_weights: None or "imagenet" (resnet50). Defaults to None.
    backbone_width, backbone_stages: int. small_cnn first-stage channels and stride-2 stages. Default 32, 4.
    backbone_lr_multiplier: float. Backbone learning rate / learning rate (0 freezes it). Defaults to 0.1.
    hidden_dim, num_heads, encoder_layers, decoder_layers, ffn_dim: int. Transformer sizes. Default 256, 8, 6, 6,
      2048.
    dropout: float. Transformer dropout. Defaults to 0.1.
    num_queries: int. Queries per group Q (the most objects one image can have). Defaults to 300.
    num_groups: int. Query groups G in training (1: plain Conditional DETR). Defaults to 11.
    aux_loss: bool. Losses on every decoder layer's output. Defaults to True.
    cls_loss_weight, bbox_loss_weight, giou_loss_weight: float. Loss weights (every layer). Default 2, 5, 2.
    cost_class, cost_bbox, cost_giou: float. Matching cost weights. Default 2, 5, 2.
    focal_alpha: float. Focal loss alpha. Defaults to 0.25.
    max_detections: int. Output slots K of `detect`. Defaults to 100.
    clip_norm: float or None. See `TaskModel`.
  """

  log_names = TERMS + ("class_error", "cardinality_error")

  def __init__(self, *, num_classes, image_size=(800, 800), backbone="resnet50", backbone_weights=None,
               backbone_width=32, backbone_stages=4, backbone_lr_multiplier=0.1, hidden_dim=256, num_heads=8,
               encoder_layers=6, decoder_layers=6, ffn_dim=2048, dropout=0.1, num_queries=300, num_groups=11,
               aux_loss=True, cls_loss_weight=2.0, bbox_loss_weight=5.0, giou_loss_weight=2.0, cost_class=2.0,
               cost_bbox=5.0, cost_giou=2.0, focal_alpha=0.25, max_detections=100, loss_weights=None, **kwargs):
    for name, value in (("num_classes", num_classes), ("num_queries", num_queries), ("num_groups", num_groups),
                        ("decoder_layers", decoder_layers), ("max_detections", max_detections)):
      check_int(name, value)
    weights = {"loss_ce": cls_loss_weight, "loss_bbox": bbox_loss_weight, "loss_giou": giou_loss_weight}
    if loss_weights is None:
      suffixes = [""] + ([f"_{k}" for k in range(decoder_layers - 1)] if aux_loss else [])
      loss_weights = {term + s: float(weights[term]) for s in suffixes for term in TERMS}
    super().__init__(image_size=image_size, loss_weights=loss_weights, **kwargs)
    self.num_classes = num_classes
    self.backbone_name, self.backbone_weights = backbone, backbone_weights
    self.backbone_width, self.backbone_stages = int(backbone_width), int(backbone_stages)
    self.backbone_lr_multiplier = float(backbone_lr_multiplier)
    self.hidden_dim, self.num_heads, self.ffn_dim = int(hidden_dim), int(num_heads), int(ffn_dim)
    self.encoder_layers, self.decoder_layers, self.dropout = int(encoder_layers), decoder_layers, float(dropout)
    self.num_queries, self.num_groups, self.aux_loss = num_queries, num_groups, bool(aux_loss)
    self.cls_loss_weight, self.bbox_loss_weight = float(cls_loss_weight), float(bbox_loss_weight)
    self.giou_loss_weight = float(giou_loss_weight)
    self.cost_class, self.cost_bbox, self.cost_giou = float(cost_class), float(cost_bbox), float(cost_giou)
    self.focal_alpha, self.max_detections = float(focal_alpha), max_detections
    # === Layers ===
    self.backbone = detr_layers.build_backbone(backbone, image_size=self.image_size, weights=backbone_weights,
                                               width=self.backbone_width, num_stages=self.backbone_stages)
    self.input_proj = keras.layers.Conv2D(self.hidden_dim, 1, name="input_proj")
    self.encoder = [detr_layers.TransformerEncoderLayer(self.hidden_dim, self.num_heads, self.ffn_dim, self.dropout,
                                                        name=f"encoder{i}") for i in range(self.encoder_layers)]
    self.decoder = detr_layers.ConditionalDecoder(self.hidden_dim, self.num_heads, self.ffn_dim, decoder_layers,
                                                  self.dropout, name="decoder")
    self.query_embed = self.add_weight(shape=(num_groups * num_queries, self.hidden_dim), name="query_embed",
                                       initializer=keras.initializers.RandomNormal(stddev=1.0))
    prior_bias = -float(tf.math.log((1.0 - detr_layers.PRIOR_PROB) / detr_layers.PRIOR_PROB))
    self.class_head = keras.layers.Dense(num_classes, bias_initializer=keras.initializers.Constant(prior_bias),
                                         name="class_head")
    self.box_head = detr_layers.MLP(self.hidden_dim, 4, 3, zero_last=True, name="box_head")

  def call(self, images, training=False):
    """images [B, H, W, 3] uint8/float 0..255 -> dict of float32 `logits` [L, B, N, C] and `boxes` [L, B, N, 4]
    (normalised cxcywh), one entry per decoder layer; N = G * Q in training, Q otherwise."""
    features = self.input_proj(self.backbone(images, training=training))  # [B, h, w, D]
    height, width = features.shape[1], features.shape[2]
    memory = tf.reshape(features, [-1, height * width, self.hidden_dim])  # [B, S, D]
    pos = detr_layers.sine_position_encoding(height, width, self.hidden_dim)  # [S, D]
    for layer in self.encoder:
      memory = layer(memory, pos, training=training)
    groups = self.num_groups if training else 1
    queries = self.query_embed[:groups * self.num_queries]  # [N, D]
    hs, reference = self.decoder(memory, pos, queries, num_groups=groups, training=training)  # [L, B, N, D], [N, 2]
    logits = tf.cast(self.class_head(hs), tf.float32)
    offsets = tf.cast(self.box_head(hs), tf.float32)  # [L, B, N, 4]
    reference = tf.pad(detr_layers.inverse_sigmoid(reference), [[0, 0], [0, 2]])  # [N, 4]: (x, y, 0, 0)
    return {"logits": logits, "boxes": tf.sigmoid(offsets + reference)}

  def compute_losses(self, images, labels, training):
    max_instances = labels["boxes"].shape[1]
    if max_instances is not None and max_instances > self.num_queries:
      raise ConfigError(f"the data has up to {max_instances} objects per image (data.max_instances) but the model "
                        f"has only {self.num_queries} queries per group (model.num_queries): raise "
                        "model.num_queries or lower data.max_instances.")
    outputs = self(images, training=training)
    logits, boxes = outputs["logits"], outputs["boxes"]
    aux = [(logits[k], boxes[k]) for k in range(self.decoder_layers - 1)] if self.aux_loss else []
    gt_boxes = box_ops.yxyx_to_cxcywh(tf.cast(labels["boxes"], tf.float32))
    losses = group_detr_loss(logits[-1], boxes[-1], gt_boxes, labels["classes"], labels["valid"],
                             num_groups=self.num_groups if training else 1, aux_outputs=aux,
                             cost_class=self.cost_class, cost_bbox=self.cost_bbox, cost_giou=self.cost_giou,
                             focal_alpha=self.focal_alpha, gt_box_format="cxcywh")
    return {name: value for name, value in losses.items() if value.shape.rank == 0}

  def train_step(self, data):
    """TaskModel's step, with the backbone's update scaled by `backbone_lr_multiplier` (see the module doc)."""
    backbone_vars = self.backbone.trainable_variables
    if self.backbone_lr_multiplier == 1.0 or not backbone_vars:
      return super().train_step(data)
    images, labels = data
    grads, total, terms = self.compute_gradients(images, labels)
    grads = self.clip_gradients(grads)
    before = [tf.identity(v.value) for v in backbone_vars]
    self.optimizer.apply(grads, self.trainable_variables)
    _scale_updates([v.value for v in backbone_vars], before, self.backbone_lr_multiplier)
    return self._log(total, terms)

  def detect(self, images):
    """images [B, H, W, 3] 0..255 -> `boxes` [B, K, 4] float32 normalised yxyx of the canvas (clipped to it),
    `scores` [B, K] float32, `classes` [B, K] int32, `num_detections` [B] int32; K = max_detections, the best
    (query, class) pairs of the first group by sigmoid score, no NMS; slots beyond Q * C are padding."""
    outputs = self(images, training=False)
    probs = tf.sigmoid(outputs["logits"][-1])  # [B, Q, C]
    batch = tf.shape(probs)[0]
    k = min(self.max_detections, self.num_queries * self.num_classes)
    scores, index = tf.math.top_k(tf.reshape(probs, [batch, -1]), k=k)  # [B, k]
    boxes = tf.gather(outputs["boxes"][-1], index // self.num_classes, batch_dims=1)  # [B, k, 4] cxcywh
    boxes = box_ops.clip_boxes(box_ops.cxcywh_to_yxyx(boxes))
    classes = index % self.num_classes
    pad = self.max_detections - k
    return {
        "boxes": tf.pad(boxes, [[0, 0], [0, pad], [0, 0]]),
        "scores": tf.pad(scores, [[0, 0], [0, pad]]),
        "classes": tf.pad(classes, [[0, 0], [0, pad]], constant_values=-1),
        "num_detections": tf.fill([batch], k),
    }

  # === Config ===

  def get_config(self):
    config = super().get_config()
    config.update(
        num_classes=self.num_classes, backbone=self.backbone_name, backbone_weights=self.backbone_weights,
        backbone_width=self.backbone_width, backbone_stages=self.backbone_stages,
        backbone_lr_multiplier=self.backbone_lr_multiplier, hidden_dim=self.hidden_dim, num_heads=self.num_heads,
        encoder_layers=self.encoder_layers, decoder_layers=self.decoder_layers, ffn_dim=self.ffn_dim,
        dropout=self.dropout, num_queries=self.num_queries, num_groups=self.num_groups, aux_loss=self.aux_loss,
        cls_loss_weight=self.cls_loss_weight, bbox_loss_weight=self.bbox_loss_weight,
        giou_loss_weight=self.giou_loss_weight, cost_class=self.cost_class, cost_bbox=self.cost_bbox,
        cost_giou=self.cost_giou, focal_alpha=self.focal_alpha, max_detections=self.max_detections)
    return config


def build(options: GroupDetrOptions, *, num_classes, image_size, clip_norm=None):
  return ConditionalDetr(**dataclasses.asdict(options), num_classes=num_classes, image_size=image_size,
                         clip_norm=clip_norm)
