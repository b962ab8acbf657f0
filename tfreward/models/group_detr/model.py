"""Conditional DETR (Meng et al., 2021) trained with Group DETR's group-wise one-to-many assignment (Chen et al., 2022).

  images [B, H, W, 3] 0..255 -> backbone -> 1x1 conv to D -> + sine positions -> transformer encoder -> memory
  query embeddings [G*Q, D] (training; the first Q at inference) -> conditional decoder (`layers`)
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
`learning_rate_multipliers` gives the backbone `backbone_lr_multiplier`, and `TaskModel.apply_gradients` scales its
*update* (scaling gradients would not work with Adam, whose step ignores their scale).

Backbones (`tfreward.models.backbones`): "resnet50" is `ResNet(50)`'s C5 (stride 32, frozen BatchNorm, stem and
first stage frozen, as DETR); "small_cnn" is `SmallCNN` on ImageNet-normalised images.
"""

import keras
import tensorflow as tf

from tfreward.errors import ConfigError
from tfreward.losses.detr import group_detr_loss
from tfreward.models import backbones
from tfreward.models.base import TaskModel
from tfreward.models.group_detr import layers
from tfreward.models.group_detr.options import GroupDetrOptions
from tfreward.models.layers.mlp import MLP
from tfreward.ops import boxes as box_ops

TERMS = ("loss_ce", "loss_bbox", "loss_giou")
PRIOR_PROB = 0.01


class GroupDetr(TaskModel):
  """Conditional DETR with Group DETR training: `GroupDetr(options, *, num_classes, image_size, clip_norm)`.

  `options` is a `GroupDetrOptions` (or a dict of its keys); `num_classes` C are sigmoid outputs (no "no object"
  class). See `TaskModel`.
  """

  options_cls = GroupDetrOptions
  log_names = TERMS + ("class_error", "cardinality_error")

  def __init__(self, options=None, **kwargs):
    super().__init__(options, **kwargs)
    o = self.options
    # === Layers ===
    if o.backbone == "small_cnn":
      self.backbone = backbones.SmallCNN(o.backbone_width, o.backbone_stages, name="backbone")
    else:
      self.backbone = backbones.ResNet(50, image_size=self.image_size, weights=o.backbone_weights, frozen_bn=True,
                                       frozen_stages=1, name="backbone")
    self.input_proj = keras.layers.Conv2D(o.hidden_dim, 1, name="input_proj")
    self.encoder = [layers.TransformerEncoderLayer(o.hidden_dim, o.num_heads, o.ffn_dim, o.dropout,
                                                   name=f"encoder{i}") for i in range(o.encoder_layers)]
    self.decoder = layers.ConditionalDecoder(o.hidden_dim, o.num_heads, o.ffn_dim, o.decoder_layers, o.dropout,
                                             name="decoder")
    self.query_embed = self.add_weight(shape=(o.num_groups * o.num_queries, o.hidden_dim), name="query_embed",
                                       initializer=keras.initializers.RandomNormal(stddev=1.0))
    prior_bias = -float(tf.math.log((1.0 - PRIOR_PROB) / PRIOR_PROB))
    self.class_head = keras.layers.Dense(self.num_classes, bias_initializer=keras.initializers.Constant(prior_bias),
                                         name="class_head")
    self.box_head = MLP(o.hidden_dim, 4, 3, zero_last=True, name="box_head")

  @property
  def loss_weights(self):
    """Every decoder layer's terms (suffix `_k` for layer k < L - 1 with aux_loss) at the options' weights."""
    o = self.options
    weights = {"loss_ce": o.cls_loss_weight, "loss_bbox": o.bbox_loss_weight, "loss_giou": o.giou_loss_weight}
    suffixes = [""] + ([f"_{k}" for k in range(o.decoder_layers - 1)] if o.aux_loss else [])
    return {term + s: float(weights[term]) for s in suffixes for term in TERMS}

  def learning_rate_multipliers(self):
    """The backbone at `backbone_lr_multiplier` x lr."""
    return [(self.backbone.trainable_variables, self.options.backbone_lr_multiplier)]

  def _features(self, images, training):
    """images [B, H, W, 3] 0..255 -> backbone features [B, h, w, C]."""
    if self.options.backbone == "small_cnn":
      return self.backbone(backbones.normalize_images(images, "imagenet", self.compute_dtype), training=training)
    return self.backbone(images, training=training)["C5"]

  def call(self, images, training=False):
    """images [B, H, W, 3] uint8/float 0..255 -> dict of float32 `logits` [L, B, N, C] and `boxes` [L, B, N, 4]
    (normalised cxcywh), one entry per decoder layer; N = G * Q in training, Q otherwise."""
    features = self.input_proj(self._features(images, training))  # [B, h, w, D]
    height, width = features.shape[1], features.shape[2]
    memory = tf.reshape(features, [-1, height * width, self.options.hidden_dim])  # [B, S, D]
    pos = layers.sine_position_encoding(height, width, self.options.hidden_dim)  # [S, D]
    for layer in self.encoder:
      memory = layer(memory, pos, training=training)
    groups = self.options.num_groups if training else 1
    queries = self.query_embed[:groups * self.options.num_queries]  # [N, D]
    hs, reference = self.decoder(memory, pos, queries, num_groups=groups, training=training)  # [L, B, N, D], [N, 2]
    logits = tf.cast(self.class_head(hs), tf.float32)
    offsets = tf.cast(self.box_head(hs), tf.float32)  # [L, B, N, 4]
    reference = tf.pad(layers.inverse_sigmoid(reference), [[0, 0], [0, 2]])  # [N, 4]: (x, y, 0, 0)
    return {"logits": logits, "boxes": tf.sigmoid(offsets + reference)}

  def compute_losses(self, images, labels, training):
    o = self.options
    max_instances = labels["boxes"].shape[1]
    if max_instances is not None and max_instances > o.num_queries:
      raise ConfigError(f"the data has up to {max_instances} objects per image (data.max_instances) but the model "
                        f"has only {o.num_queries} queries per group (model.num_queries): raise "
                        "model.num_queries or lower data.max_instances.")
    outputs = self(images, training=training)
    logits, boxes = outputs["logits"], outputs["boxes"]
    aux = [(logits[k], boxes[k]) for k in range(o.decoder_layers - 1)] if o.aux_loss else []
    gt_boxes = box_ops.yxyx_to_cxcywh(tf.cast(labels["boxes"], tf.float32))
    losses = group_detr_loss(logits[-1], boxes[-1], gt_boxes, labels["classes"], labels["valid"],
                             num_groups=o.num_groups if training else 1, aux_outputs=aux, cost_class=o.cost_class,
                             cost_bbox=o.cost_bbox, cost_giou=o.cost_giou, focal_alpha=o.focal_alpha,
                             gt_box_format="cxcywh")
    return {name: value for name, value in losses.items() if value.shape.rank == 0}

  def detect(self, images):
    """images [B, H, W, 3] 0..255 -> `boxes` [B, K, 4] float32 normalised yxyx of the canvas (clipped to it),
    `scores` [B, K] float32, `classes` [B, K] int32, `num_detections` [B] int32; K = max_detections, the best
    (query, class) pairs of the first group by sigmoid score, no NMS; slots beyond Q * C are padding."""
    outputs = self(images, training=False)
    probs = tf.sigmoid(outputs["logits"][-1])  # [B, Q, C]
    batch = tf.shape(probs)[0]
    max_detections = self.options.max_detections
    k = min(max_detections, self.options.num_queries * self.num_classes)
    scores, index = tf.math.top_k(tf.reshape(probs, [batch, -1]), k=k)  # [B, k]
    boxes = tf.gather(outputs["boxes"][-1], index // self.num_classes, batch_dims=1)  # [B, k, 4] cxcywh
    boxes = box_ops.clip_boxes(box_ops.cxcywh_to_yxyx(boxes))
    classes = index % self.num_classes
    pad = max_detections - k
    return {
        "boxes": tf.pad(boxes, [[0, 0], [0, pad], [0, 0]]),
        "scores": tf.pad(scores, [[0, 0], [0, pad]]),
        "classes": tf.pad(classes, [[0, 0], [0, pad]], constant_values=-1),
        "num_detections": tf.fill([batch], k),
    }
