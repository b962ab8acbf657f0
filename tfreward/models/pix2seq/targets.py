"""Maximum-likelihood targets of the Pix2Seq detector: ground-truth slots, then filler slots up to the sequence length.

A target has `num_boxes` slots of 6 tokens (`tfreward.ops.sequence`). The ground-truth objects come first (random,
raster or dataset order) with conf token `max_conf`; the remaining slots are filled in one of two ways:

  "noise": Pix2Seq's sequence augmentation. Each filler slot is a noise box with conf token 0: with probability 1/2 a
           jittered copy of a random ground-truth box (a near-duplicate; a random box when the image has none), else a
           random box, with a random class. Only its conf token is supervised (weight 1); its coordinate and class
           tokens are teacher-forcing inputs with weight 0. The model learns to score its own extra boxes, so every
           slot is a useful, ranked detection.
  "empty": in-kind empty slots (coordinate bins 0, class 0, conf 0), all supervised: they decode exactly like the
           reference's all-zero padding, and the model learns to stop (the seed paper's MLE baseline).

Every function is static-shape and draws its randomness with `sampling.stateless_uniform` and `sampling.split`:
XLA-compilable, and the same seed gives the same targets eagerly and under XLA.
"""

import tensorflow as tf

from tfreward.ops import sequence
from tfreward.ops import sampling
from tfreward.ops.sampling import stateless_uniform as uniform


def empty_slots(tokens, *, max_level, max_conf, num_cls):
  """Rewrites the padding slots (conf token <= 0) of `tokens` [B, L] int32 as in-kind empty slots; [B, L] int32."""
  layout = sequence.TokenLayout(max_level, max_conf, num_cls)
  kinds = sequence.token_kinds(tokens.shape[1])  # [L]
  fill = tf.where(kinds == sequence.COORD, layout.coord_offset,
                  tf.where(kinds == sequence.CLASS, layout.class_offset, 0))  # [L]
  padding = tf.repeat(tokens[:, 5::6] <= 0, sequence.TOKENS_PER_BOX, axis=1)  # [B, L]
  return tf.where(padding, fill[None, :], tokens)


def noise_boxes(boxes, valid, *, num_boxes, seed, jitter=0.2):
  """Noise boxes: jittered copies of random ground-truth boxes, or random boxes.

  Args:
    boxes: [B, M, 4] float normalised yxyx ground truth.
    valid: [B, M] bool.
    num_boxes: int. Noise boxes per image, S.
    seed: [2] int stateless seed.
    jitter: float. Corner shifts are uniform in +-jitter times the box height / width. Defaults to 0.2.

  Returns:
    [B, S, 4] float32 normalised yxyx boxes, clipped to [0, 1], ymin <= ymax and xmin <= xmax.
  """
  boxes = tf.cast(boxes, tf.float32)
  batch, m = tf.shape(boxes)[0], boxes.shape[1]
  pick_seed, jitter_seed, corner_seed, size_seed, kind_seed = tf.unstack(
      sampling.split(seed, 5))
  # A random valid ground-truth box per slot (uniform over the valid ones, via Gumbel-max over log(valid)).
  logits = tf.where(valid, 0.0, -1e9)[:, None, :] * tf.ones([1, num_boxes, 1])  # [B, S, M]
  u = tf.maximum(uniform([batch, num_boxes, m], pick_seed), 1e-20)
  pick = tf.argmax(logits - tf.math.log(-tf.math.log(u)), axis=-1, output_type=tf.int32)  # [B, S]
  source = tf.gather(boxes, pick, batch_dims=1)  # [B, S, 4]
  hw = tf.tile(source[..., 2:] - source[..., :2], [1, 1, 2])  # [B, S, 4]
  shift = uniform([batch, num_boxes, 4], jitter_seed, -jitter, jitter)
  jittered = source + shift * hw
  corner = uniform([batch, num_boxes, 2], corner_seed)
  size = uniform([batch, num_boxes, 2], size_seed, 0.05, 0.6)
  random_box = tf.concat([corner, corner + size], axis=-1)
  has_gt = tf.reduce_any(valid, axis=1)[:, None, None]  # [B, 1, 1]
  use_jitter = (uniform([batch, num_boxes, 1], kind_seed) < 0.5) & has_gt
  out = tf.clip_by_value(tf.where(use_jitter, jittered, random_box), 0.0, 1.0)
  ymin, xmin, ymax, xmax = tf.unstack(out, axis=-1)
  return tf.stack([tf.minimum(ymin, ymax), tf.minimum(xmin, xmax), tf.maximum(ymin, ymax), tf.maximum(xmin, xmax)],
                  axis=-1)


def mle_targets(boxes, classes, valid, *, max_level, max_conf, num_cls, num_boxes, filler="noise", order="random",
                seed=None):
  """Target tokens and per-token loss weights for teacher-forced MLE.

  Args:
    boxes: [B, M, 4] float normalised yxyx. classes: [B, M] int (-1 padding). valid: [B, M] bool.
    max_level, max_conf, num_cls: int. The `sequence.TokenLayout`.
    num_boxes: int. Slots S; the sequence length is L = 6 * S (objects beyond S are dropped).
    filler: "noise" or "empty" (see the module docstring). Defaults to "noise".
    order: object order: "random" (a new permutation every call), "raster" (by top-left corner: top to bottom, then
      left to right) or "fixed" (dataset order). Defaults to "random".
    seed: [2] int stateless seed; required unless order is "fixed" and filler is "empty".

  Returns:
    tokens: [B, L] int32, every position of its kind.
    weights: [B, L] float32 loss weights (0 on the coordinates and classes of noise slots, else 1).
  """
  if filler not in ("noise", "empty"):
    raise ValueError(f"filler must be 'noise' or 'empty', got {filler!r}.")
  if seed is None and (order == "random" or filler == "noise"):
    raise ValueError(f"a seed is required with order={order!r} and filler={filler!r}.")
  layout = dict(max_level=max_level, max_conf=max_conf, num_cls=num_cls)
  seq_len = sequence.TOKENS_PER_BOX * num_boxes
  order_seed, noise_seed, class_seed = (tf.unstack(sampling.split(seed, 3))
                                        if seed is not None else (None, None, None))
  if order == "random":  # permute here: `uniform` draws the same order eagerly and under XLA
    keys = uniform(tf.shape(valid), order_seed)  # [B, M]
  elif order == "raster":  # top to bottom, then left to right, by quantised top-left corner
    corner = tf.round(tf.clip_by_value(tf.cast(boxes[..., :2], tf.float32), 0.0, 1.0) * max_level)  # [B, M, 2]
    keys = corner[..., 0] * (max_level + 1) + corner[..., 1]
  elif order != "fixed":
    raise ValueError(f"order must be 'random', 'raster' or 'fixed', got {order!r}.")
  if order != "fixed":
    perm = tf.argsort(keys, axis=1, stable=True)  # [B, M]; padding objects go last in boxes_to_sequence
    boxes, classes, valid = (tf.gather(x, perm, batch_dims=1) for x in (boxes, classes, valid))
  tokens = sequence.boxes_to_sequence(boxes, classes, valid, seq_len=seq_len, order="fixed", **layout)  # [B, L]
  if filler == "empty":
    return empty_slots(tokens, **layout), tf.ones(tf.shape(tokens), tf.float32)
  noise = noise_boxes(boxes, valid, num_boxes=num_boxes, seed=noise_seed)  # [B, S, 4]
  noise_classes = tf.minimum(tf.cast(uniform(tf.shape(noise)[:2], class_seed) * num_cls, tf.int32), num_cls - 1)
  noise_tokens = sequence.boxes_to_sequence(noise, noise_classes, tf.ones(tf.shape(noise)[:2], tf.bool),
                                            seq_len=seq_len, order="fixed", **layout)
  is_noise = tf.repeat(tokens[:, 5::6] <= 0, sequence.TOKENS_PER_BOX, axis=1)  # [B, L]
  conf = tf.equal(sequence.token_kinds(seq_len), sequence.CONF)[None, :]  # [1, L]
  noise_tokens = tf.where(conf, 0, noise_tokens)  # noise slots say "no box"
  weights = tf.where(is_noise & ~conf, 0.0, 1.0)
  return tf.where(is_noise, noise_tokens, tokens), weights
