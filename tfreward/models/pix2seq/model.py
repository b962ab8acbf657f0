"""Pix2Seq-style sequence detector, pre-trained by maximum likelihood and tuned with a task reward (seeds 000, 003).

  images [B, H, W, 3] 0..255 -> encoder (`encoders`: small CNN or ResNet-50, + Transformer layers) -> memory
  [B, S, D] -> autoregressive Transformer decoder (`decoder`) over the tokens of `tfreward.ops.sequence` (6 per
  box: ymin, xmin, ymax, xmax, class, conf) -> L = 6 * num_boxes tokens.

Modes (`Pix2SeqOptions.mode`; both share every weight, so a reward run starts from an MLE run's weights file):
  "mle":    teacher-forced cross-entropy `loss_mle` on the ground truth then filler slots (`mle`, `targets`).
  "reward": REINFORCE with the leave-one-out baseline on sequences sampled inside the step, plus the confidence loss
            (`reward`; weights 1 and `conf_weight`), plus `mle_weight` x `loss_mle` when set. Logs `reward`; the
            recipe's `RewardStatsCallback` (`recipe_callbacks`) logs `reward_statistics()`.

Randomness inside the step (object order, samples) is stateless: the seed is `fold_in(fold_in((seed, salt), step),
replica id)` with step = the optimizer's iteration counter, so a run is reproducible and replicas draw differently.
`compute_losses(..., samples=...)` takes given samples instead (the path that compares replica layouts).

`detect` decodes one sequence per image inside XLA (`options.detect`: greedy by default) and returns every slot as a
detection, scored by the expected IoU its conf-token distribution implies; fixed size K = num_boxes.
"""

import tensorflow as tf

from tfreward.models.base import RecipeCallback, TaskModel
from tfreward.models.pix2seq import encoders
from tfreward.models.pix2seq import mle
from tfreward.models.pix2seq import reward
from tfreward.models.pix2seq.decoder import SequenceDecoder, decode
from tfreward.models.pix2seq.options import Pix2SeqOptions
from tfreward.ops import finite
from tfreward.ops import sampling
from tfreward.ops import sequence
from tfreward.rewards import detection

_SALT_TARGET, _SALT_SAMPLES, _SALT_DETECT = 1, 2, 3


class Pix2Seq(TaskModel):
  """Sequence detector: `Pix2Seq(options, *, num_classes, image_size)`; see the module docstring and `TaskModel`."""

  options_cls = Pix2SeqOptions

  def __init__(self, options=None, **kwargs):
    super().__init__(options, **kwargs)
    o = self.options
    self.layout = dict(max_level=o.max_level, max_conf=o.max_conf, num_cls=self.num_classes)
    token_layout = sequence.TokenLayout(**self.layout)
    self.vocab_size = token_layout.vocab_size
    self.seq_len = sequence.TOKENS_PER_BOX * o.num_boxes
    counts = o.cls_counts
    if isinstance(counts, str):
      counts = detection.COCO_CLS_COUNTS if counts == "coco" else (1,) * self.num_classes
    if len(counts) != self.num_classes:
      raise ValueError(f"cls_counts must have num_classes={self.num_classes} entries, got {o.cls_counts!r}.")
    self.reward_config = dict(nms_w=o.nms_w, cls_smooth=o.cls_smooth, reward_thr=tuple(o.reward_thr),
                              correct_thr=o.correct_thr, cls_counts=tuple(int(c) for c in counts),
                              legacy_threshold_keys=o.legacy_threshold_keys, **self.layout)
    # === Layers ===
    blocks = dict(dim=o.dim, num_layers=o.encoder_layers, num_heads=o.num_heads, mlp_ratio=o.mlp_ratio)
    if o.encoder == "cnn":
      self.encoder = encoders.ConvEncoder(width=o.encoder_width, num_stages=o.encoder_stages, name="encoder",
                                          **blocks)
    else:
      self.encoder = encoders.ResNetEncoder(image_size=self.image_size, name="encoder", **blocks)
    memory_hw = self.encoder.feature_hw(self.image_size) if o.box_attention else None
    self.decoder = SequenceDecoder(
        vocab_size=self.vocab_size, seq_len=self.seq_len, dim=o.dim, num_layers=o.decoder_layers,
        num_heads=o.num_heads, mlp_ratio=o.mlp_ratio, memory_hw=memory_hw, name="decoder",
        coord_tokens=token_layout.token_range(sequence.COORD))

  @property
  def loss_weights(self):
    if self.options.mode == "mle":
      return {"loss_mle": 1.0}
    weights = {"loss_reward": 1.0, "loss_conf": self.options.conf_weight}
    if self.options.mle_weight:
      weights["loss_mle"] = float(self.options.mle_weight)
    return weights

  @property
  def log_names(self):
    if self.options.mode == "mle":
      return ("loss_mle",)
    return ("loss_reward", "loss_conf", "reward") + (("loss_mle",) if self.options.mle_weight else ())

  def call(self, images, training=False):
    """Builds every layer: teacher-forced logits [B, L, V] float32 of an all-start-token input."""
    memory = self.encoder(images, training=training)
    inputs = tf.fill([tf.shape(images)[0], self.seq_len], self.decoder.bos_token)
    return self.decoder(inputs, memory)

  # === Randomness and decoding ===

  def step_seed(self, salt):
    """[2] int64 stateless seed of this step and replica (see the module docstring)."""
    optimizer = getattr(self, "optimizer", None)
    step = optimizer.iterations if optimizer is not None else 0
    ctx = tf.distribute.get_replica_context()
    replica = ctx.replica_id_in_sync_group if ctx is not None else 0
    seed = sampling.fold_in(tf.constant([self.options.seed, salt], tf.int64), step)
    return sampling.fold_in(seed, replica)

  def sample(self, memory, sampling_options, *, num_samples, seed=None, return_logits=False):
    """Decodes from memory [B, S, D] with `SamplingOptions`: dict tokens [B, N, L] int32 (+ logits [B, N, L, V])."""
    return decode(self.decoder, memory, sampling_options, layout=self.layout, num_samples=num_samples, seed=seed,
                  return_logits=return_logits)

  # === Losses ===

  def compute_losses(self, images, labels, training, samples=None):
    """Loss terms and statistics, this replica's shares (see `TaskModel.compute_losses`).

    samples: optional [B, N, L] int32 sequences to reward-tune on instead of sampling (reward mode only).
    """
    o = self.options
    if samples is not None and o.mode != "reward":
      raise ValueError(f"samples are for reward mode, but this model is in {o.mode!r} mode.")
    memory = self.encoder(images, training=training)
    terms = {}
    if o.mode == "reward":
      terms = reward.reward_losses(self.decoder, memory, labels, o, layout=self.layout,
                                   reward_config=self.reward_config, samples=samples,
                                   seed=self.step_seed(_SALT_SAMPLES) if samples is None else None)
    if o.mode == "mle" or o.mle_weight:
      terms.update(mle.mle_loss(self.decoder, memory, labels, layout=self.layout, num_boxes=o.num_boxes,
                                filler=o.filler, order=o.order, seed=self.step_seed(_SALT_TARGET)))
    # Each part NaNs its terms on non-finite logits (`tfreward.ops.finite`); one NaN part makes every term NaN.
    return finite.nan_if_not_finite(terms, *terms.values())

  # === Statistics ===

  @property
  def statistic_names(self):
    """Reward mode: the statistics `reward_statistics()` reports besides `reward` (none in "mle" mode)."""
    return reward.statistic_names(self.options.reward_thr) if self.options.mode == "reward" else ()

  def recipe_callbacks(self):
    """Reward mode: `RewardStatsCallback` (by name), which logs `reward_statistics()`."""
    return [RecipeCallback("reward_stats", {})] if self.options.mode == "reward" else []

  # === Inference ===

  def detect(self, images):
    """images [B, H, W, 3] 0..255 -> fixed-size detections, K = num_boxes, sorted by score:
    boxes [B, K, 4] float32 normalised yxyx, scores [B, K] float32 (expected IoU from the conf tokens),
    classes [B, K] int32, num_detections [B] int32 (= K)."""
    o = self.options
    memory = self.encoder(images, training=False)
    out = self.sample(memory, o.detect, num_samples=1, seed=tf.constant([o.seed, _SALT_DETECT]), return_logits=True)
    tokens, logits = out["tokens"][:, 0], out["logits"][:, 0]  # [B, L], [B, L, V]
    # Every slot is a detection: score it with its conf distribution, whatever conf token was decoded.
    every_slot = tf.where(sequence.token_kinds(self.seq_len) == sequence.CONF, o.max_conf, tokens)
    found = sequence.sequence_to_detections(every_slot, logits=logits, **self.layout)
    ymin, xmin, ymax, xmax = tf.unstack(found["boxes"], axis=-1)
    boxes = tf.stack([tf.minimum(ymin, ymax), tf.minimum(xmin, xmax), tf.maximum(ymin, ymax),
                      tf.maximum(xmin, xmax)], axis=-1)
    order = tf.argsort(found["scores"], axis=-1, direction="DESCENDING", stable=True)
    return {
        "boxes": tf.gather(boxes, order, batch_dims=1),
        "scores": tf.gather(found["scores"], order, batch_dims=1),
        "classes": tf.gather(found["classes"], order, batch_dims=1),
        "num_detections": tf.fill([tf.shape(tokens)[0]], o.num_boxes),
    }
