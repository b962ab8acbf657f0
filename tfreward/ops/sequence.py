"""Detection sequences: boxes + classes <-> token sequences, and the token vocabulary they use.

The layout is the one of the reference reward (seed 000, arXiv 2302.08242). A sequence is a run of box slots of 6
tokens each, `[ymin, xmin, ymax, xmax, class, conf]`:

  conf token:        0 .. max_conf                        (0 marks a padding slot)
  coordinate token:  bin + max_conf + 1,                  bin in 0 .. max_level (coordinate = bin / max_level)
  class token:       class_id + max_conf + 1 + max_level + 1,   class_id in 0 .. num_cls - 1

`TokenLayout` holds these offsets; `tfreward.rewards.detection` decodes through `decode_sequence` here, so the reward
and the tokenizer cannot disagree. Decoding clips out-of-range tokens exactly as the reference does: a sequence of
length L is cut to `L - L % 6`, coordinates and classes are clipped into range, and a slot is present when its conf
token, clipped to `[0, max_conf]`, is positive (so conf tokens above `max_conf` count as present and negative ones as
padding).
"""

import dataclasses

import tensorflow as tf

from tfreward.errors import check_int

TOKENS_PER_BOX = 6

# Token kinds per position (`token_kinds`). TRAILING marks the `L % 6` positions after the last full slot.
COORD, CLASS, CONF, TRAILING = 0, 1, 2, 3


@dataclasses.dataclass(frozen=True)
class TokenLayout:
  """Where each token kind lives in the vocabulary.

  Attributes:
    max_level: int. Coordinates are quantised to bins 0..max_level.
    max_conf: int. Conf tokens are 0..max_conf; 0 is padding.
    num_cls: int. Number of classes.
  """
  max_level: int
  max_conf: int
  num_cls: int

  def __post_init__(self):
    for name in ("max_level", "max_conf", "num_cls"):
      value = getattr(self, name)
      check_int(name, value)

  @property
  def coord_offset(self):
    """First coordinate token (bin 0)."""
    return self.max_conf + 1

  @property
  def class_offset(self):
    """First class token (class 0)."""
    return self.max_conf + 1 + self.max_level + 1

  @property
  def vocab_size(self):
    """Number of tokens: conf tokens, then coordinate tokens, then class tokens."""
    return self.class_offset + self.num_cls

  def token_range(self, kind):
    """Half-open `[start, stop)` token range of a kind (COORD, CLASS or CONF)."""
    if kind == COORD:
      return self.coord_offset, self.class_offset
    if kind == CLASS:
      return self.class_offset, self.vocab_size
    if kind == CONF:
      return 0, self.max_conf + 1
    raise ValueError(f"kind must be COORD, CLASS or CONF, got {kind!r}.")


def _int_tokens(tokens, rank, name):
  tokens = tf.convert_to_tensor(tokens)
  if not tokens.dtype.is_integer:
    raise ValueError(f"{name} must be an integer tensor, got dtype {tokens.dtype.name}.")
  if rank is not None and tokens.shape.rank != rank:
    raise ValueError(f"{name} must have rank {rank}, got shape {tokens.shape}.")
  if tokens.shape.rank is None or tokens.shape.rank < 1 or tokens.shape[-1] is None:
    raise ValueError(f"{name} needs a static length, got shape {tokens.shape}.")
  return tf.cast(tokens, tf.int32)


def dequantize(bins, max_level):
  """Coordinate bins -> coordinates in [0, 1], as float32(bin) * float32(1 / max_level).

  Multiplying by the float32 reciprocal is what XLA compiles the reference's `bins / max_level` into (golden README,
  section 5), so decoded coordinates equal the reference's.

  Args:
    bins: [...] int32 in 0..max_level.
    max_level: int.

  Returns:
    [...] float32.
  """
  return tf.cast(bins, tf.float32) * tf.constant(1.0 / max_level, tf.float32)


def decode_sequence(tokens, *, max_level, max_conf, num_cls):
  """Splits token sequences into boxes, classes and conf tokens, clipped as the reference reward does.

  Args:
    tokens: [..., L] int32 or int64 token sequences; the last `L % 6` tokens are ignored.
    max_level, max_conf, num_cls: int. The `TokenLayout`.

  Returns:
    boxes: [..., L // 6, 4] float32, yxyx in [0, 1] (not reordered: an inverted slot stays inverted).
    classes: [..., L // 6] int32 in 0..num_cls-1.
    confs: [..., L // 6] int32 in 0..max_conf; 0 is a padding slot.
  """
  layout = TokenLayout(max_level, max_conf, num_cls)
  tokens = _int_tokens(tokens, None, "tokens")
  length = tokens.shape[-1]
  slots = length // TOKENS_PER_BOX
  tokens = tokens[..., :slots * TOKENS_PER_BOX]
  tokens = tf.reshape(tokens, tf.concat([tf.shape(tokens)[:-1], [slots, TOKENS_PER_BOX]], 0))  # [..., S, 6]
  bins = tf.clip_by_value(tokens[..., :4] - layout.coord_offset, 0, max_level)
  classes = tf.clip_by_value(tokens[..., 4] - layout.class_offset, 0, num_cls - 1)
  confs = tf.clip_by_value(tokens[..., 5], 0, max_conf)
  return dequantize(bins, max_level), classes, confs


def _object_order(valid, order, seed, rng):
  """[B, M] permutation putting valid objects first (input order or random), padding after (input order)."""
  m = valid.shape[1]
  index = tf.cast(tf.range(m), tf.float32)[None, :]  # [1, M]
  if order == "fixed":
    keys = index + tf.where(valid, 0.0, float(m))
  else:
    shape = tf.shape(valid)
    if seed is not None:
      noise = tf.random.stateless_uniform(shape, seed=seed, dtype=tf.float32, alg="philox")
    else:
      noise = rng.uniform(shape, dtype=tf.float32)
    keys = tf.where(valid, noise, 2.0 + index)
  return tf.argsort(keys, axis=1, stable=True)


def boxes_to_sequence(boxes, classes, valid, *, max_level, max_conf, num_cls, seq_len, order="random", seed=None,
                      rng=None):
  """Encodes ground-truth objects as token sequences: `[ymin, xmin, ymax, xmax, class, max_conf]` per object.

  Objects are placed in order (`"fixed"`: input order; `"random"`: a random permutation per image), padding objects
  are skipped, the sequence is filled up with all-zero padding slots, and objects beyond `seq_len // 6` are dropped.
  Each object gets conf token `max_conf` (the IoU-1 level the confidence head learns for a perfect box).

  Args:
    boxes: [B, M, 4] float, normalised yxyx; coordinates are clipped to [0, 1], then rounded to the nearest of
      `max_level + 1` bins (error at most 0.5 / max_level).
    classes: [B, M] int, 0-based class ids, clipped to 0..num_cls-1 (the values of padding objects are unused).
    valid: [B, M] bool, True for real objects.
    max_level, max_conf, num_cls: int. The `TokenLayout`.
    seq_len: int, a multiple of 6. Length of the output sequences.
    order: str. "random" or "fixed". Defaults to "random".
    seed: [2] int (or a Python int) for `tf.random.stateless_uniform` with the Philox algorithm: the same seed gives
      the same order eagerly and under XLA (use it in `tf.data`). One of `seed` or `rng` is required when
      `order="random"`.
    rng: `tf.random.Generator`, used when `seed` is None (a new order on every call, also under XLA).

  Returns:
    [B, seq_len] int32 tokens.
  """
  layout = TokenLayout(max_level, max_conf, num_cls)
  if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < TOKENS_PER_BOX or seq_len % 6:
    raise ValueError(f"seq_len must be a positive multiple of 6, got {seq_len!r}.")
  if order not in ("random", "fixed"):
    raise ValueError(f"order must be 'random' or 'fixed', got {order!r}.")
  if order == "random" and seed is None and rng is None:
    raise ValueError("order='random' needs a `seed` or an `rng`, got neither.")
  if seed is not None and isinstance(seed, int):
    seed = (seed, 0)
  boxes, classes, valid = tf.convert_to_tensor(boxes), tf.convert_to_tensor(classes), tf.convert_to_tensor(valid)
  if boxes.shape.rank != 3 or boxes.shape[-1] != 4 or not boxes.dtype.is_floating:
    raise ValueError(f"boxes must be a float [B, M, 4] tensor, got {boxes.dtype.name} {boxes.shape}.")
  if classes.shape.rank != 2 or not classes.dtype.is_integer:
    raise ValueError(f"classes must be an integer [B, M] tensor, got {classes.dtype.name} {classes.shape}.")
  if valid.shape.rank != 2 or valid.dtype != tf.bool:
    raise ValueError(f"valid must be a bool [B, M] tensor, got {valid.dtype.name} {valid.shape}.")
  if boxes.shape[1] is None:
    raise ValueError(f"boxes needs a static number of objects M, got shape {boxes.shape}.")
  if not (boxes.shape[:2].is_compatible_with(classes.shape) and boxes.shape[:2].is_compatible_with(valid.shape)):
    raise ValueError(f"boxes {boxes.shape}, classes {classes.shape} and valid {valid.shape} disagree on [B, M].")

  bins = tf.cast(tf.round(tf.clip_by_value(tf.cast(boxes, tf.float32), 0.0, 1.0) * max_level), tf.int32)
  cls = tf.clip_by_value(tf.cast(classes, tf.int32), 0, num_cls - 1)
  slot = tf.concat([
      bins + layout.coord_offset,
      (cls + layout.class_offset)[..., None],
      tf.fill(tf.shape(cls), max_conf)[..., None],
  ], axis=-1)  # [B, M, 6]
  slot = slot * tf.cast(valid, tf.int32)[..., None]  # padding objects become all-zero slots

  perm = _object_order(valid, order, seed, rng)  # [B, M]
  slot = tf.gather(slot, perm, axis=1, batch_dims=1)
  slots = seq_len // TOKENS_PER_BOX
  m = boxes.shape[1]
  if m >= slots:
    slot = slot[:, :slots]
  else:
    slot = tf.pad(slot, [[0, 0], [0, slots - m], [0, 0]])
  return tf.reshape(slot, [-1, seq_len])


def sequence_to_detections(tokens, *, token_probs=None, logits=None, max_level, max_conf, num_cls):
  """Decodes token sequences into fixed-size detections.

  Scores are the expected IoU implied by the conf token distribution: conf level k (1..max_conf) stands for IoU
  `(k - 1) / (max_conf - 1)` (1 when max_conf is 1) and level 0 for no box, matching the confidence loss targets
  `[1, 0, 0]` (padding) and `[0, 1 - IoU, IoU]` (a sampled box). With `token_probs` the conf entries are renormalised
  over the conf tokens, with `logits` they are a softmax over the conf tokens (the distribution a sampler constrained
  to conf tokens draws from); without either the sampled conf token itself is used (a one-hot distribution).

  Args:
    tokens: [B, L] int32 or int64. The trailing `L % 6` tokens are ignored; out-of-range tokens are clipped as the
      reward does.
    token_probs: optional [B, L, V] float probabilities of each token (V >= max_conf + 1, usually the vocab size).
    logits: optional [B, L, V] float logits; at most one of `token_probs` and `logits`.
    max_level, max_conf, num_cls: int. The `TokenLayout`.

  Returns:
    dict with, for S = L // 6 slots:
      boxes: [B, S, 4] float32 normalised yxyx (zeros for padding slots).
      classes: [B, S] int32 (-1 for padding slots).
      scores: [B, S] float32 in [0, 1] (0 for padding slots).
      valid: [B, S] bool, True where the slot holds a box (conf token > 0).
  """
  tokens = _int_tokens(tokens, 2, "tokens")
  if token_probs is not None and logits is not None:
    raise ValueError("Pass at most one of token_probs and logits, got both.")
  boxes, classes, confs = decode_sequence(tokens, max_level=max_level, max_conf=max_conf, num_cls=num_cls)
  valid = confs > 0
  slots = tokens.shape[-1] // TOKENS_PER_BOX
  if max_conf == 1:
    iou_of_level = [0.0, 1.0]
  else:
    iou_of_level = [0.0] + [(k - 1) / (max_conf - 1) for k in range(1, max_conf + 1)]
  iou_of_level = tf.constant(iou_of_level, tf.float32)  # [max_conf + 1]
  dist = token_probs if token_probs is not None else logits
  if dist is None:
    scores = tf.gather(iou_of_level, confs)
  else:
    dist = tf.convert_to_tensor(dist)
    if dist.shape.rank != 3 or not dist.dtype.is_floating:
      raise ValueError(f"token_probs / logits must be a float [B, L, V] tensor, got {dist.dtype.name} {dist.shape}.")
    if dist.shape[1] != tokens.shape[1] or (dist.shape[2] is not None and dist.shape[2] < max_conf + 1):
      raise ValueError(f"token_probs / logits shape {dist.shape} does not fit tokens {tokens.shape} and "
                       f"max_conf={max_conf}.")
    conf = tf.cast(dist[:, 5:slots * TOKENS_PER_BOX:TOKENS_PER_BOX, :max_conf + 1], tf.float32)  # [B, S, C]
    if logits is not None:
      conf = tf.nn.softmax(conf, axis=-1)
    else:
      conf = tf.math.divide_no_nan(conf, tf.reduce_sum(conf, axis=-1, keepdims=True))
    scores = tf.reduce_sum(conf * iou_of_level, axis=-1)
  return {
      "boxes": tf.where(valid[..., None], boxes, 0.0),
      "classes": tf.where(valid, classes, -1),
      "scores": tf.where(valid, scores, 0.0),
      "valid": valid,
  }


def token_kinds(seq_len):
  """[seq_len] int32 kind of each position: COORD, CLASS, CONF, or TRAILING after the last full slot."""
  check_int("seq_len", seq_len)
  pattern = tf.constant([COORD] * 4 + [CLASS, CONF], tf.int32)
  slots = seq_len // TOKENS_PER_BOX
  trailing = tf.fill([seq_len - slots * TOKENS_PER_BOX], TRAILING)
  return tf.concat([tf.tile(pattern, [slots]), trailing], axis=0)


def allowed_tokens(seq_len, *, max_level, max_conf, num_cls):
  """[seq_len, V] bool: which tokens each position may hold (its kind's range; TRAILING positions only token 0).

  A sampler constrains decoding with it (see `constrain_logits`). V is `TokenLayout.vocab_size`.
  """
  layout = TokenLayout(max_level, max_conf, num_cls)
  vocab = tf.range(layout.vocab_size)[None, :]  # [1, V]
  kinds = token_kinds(seq_len)[:, None]  # [L, 1]
  allowed = tf.zeros([seq_len, layout.vocab_size], tf.bool)
  for kind in (COORD, CLASS, CONF):
    start, stop = layout.token_range(kind)
    allowed |= (kinds == kind) & (vocab >= start) & (vocab < stop)
  return allowed | ((kinds == TRAILING) & (vocab == 0))


def constrain_logits(logits, *, max_level, max_conf, num_cls):
  """Sets the logits of tokens a position may not hold (see `allowed_tokens`) to the dtype's lowest finite value.

  A sampler decoding one position `t` at a time gathers row `t` of `allowed_tokens` instead.

  Args:
    logits: [..., L, V] float logits for positions 0..L-1; V must be `TokenLayout.vocab_size`.
    max_level, max_conf, num_cls: int. The `TokenLayout`.

  Returns:
    [..., L, V] logits, same dtype.
  """
  logits = tf.convert_to_tensor(logits)
  layout = TokenLayout(max_level, max_conf, num_cls)
  if (logits.shape.rank is None or logits.shape.rank < 2 or logits.shape[-1] != layout.vocab_size
      or logits.shape[-2] is None or not logits.dtype.is_floating):
    raise ValueError(f"logits must be float [..., L, {layout.vocab_size}] with a static L, got "
                     f"{logits.dtype.name} {logits.shape}.")
  mask = allowed_tokens(logits.shape[-2], max_level=max_level, max_conf=max_conf, num_cls=num_cls)
  return tf.where(mask, logits, tf.cast(logits.dtype.min, logits.dtype))


def slot_prefixes(tokens):
  """Every slot-prefix of sequences: what a sequence says before each of its slots.

  Args:
    tokens: [..., L] int sequences, L a static multiple of 6 (S = L // 6 box slots).

  Returns:
    [..., S, L] same dtype: entry k is `tokens` with slots k..S-1 made padding (conf token 0), slots 0..k-1 kept.
    Entry 0 is all padding.
  """
  tokens = tf.convert_to_tensor(tokens)
  length = tokens.shape[-1]
  if not tokens.dtype.is_integer or length is None or length % TOKENS_PER_BOX or length == 0:
    raise ValueError(f"tokens must be an integer [..., L] tensor with L a positive multiple of 6, got "
                     f"{tokens.dtype.name} {tokens.shape}.")
  slots = length // TOKENS_PER_BOX
  slot_of = tf.range(length) // TOKENS_PER_BOX  # [L]
  keep = (slot_of[None, :] < tf.range(slots)[:, None]) | (token_kinds(length) != CONF)[None, :]  # [S, L]
  return tf.where(keep, tokens[..., None, :], tf.zeros([], tokens.dtype))
