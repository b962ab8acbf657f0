"""Conditional DETR building blocks (Meng et al., 2021): sine encodings, encoder layer, conditional decoder.

Positions: `sine_position_encoding` is DETR's 2D sine encoding of the feature grid (cell centres normalised to
[0, 1] times 2 pi; the whole canvas counts as image, like the boxes, which are normalised to the canvas), and
`sine_embed_for_position` the same encoding of arbitrary (x, y) points (Conditional DETR's
`gen_sineembed_for_position`): [..., 2] -> [..., D], y features first, sin and cos interleaved.

`TransformerEncoderLayer`: DETR's post-norm layer, positions added to queries and keys only.
`ConditionalDecoder`: reference points s = sigmoid(MLP(query embedding)); per layer the spatial query is
sine_embed(s) * T(f), where T is an MLP of the decoder content f (identity for the first layer); cross-attention
concatenates, per head, the content and spatial parts of queries (content, spatial query) and keys (content,
key positions), so the attention weight is the sum of a content and a spatial dot product. Group DETR: with
`num_groups` G > 1 the query axis [B, G*Q, D] is reshaped to [B*G, Q, D] for self-attention only, so groups never
see each other; cross-attention and the feed-forward network treat every query alike.

Attention logits and softmaxes run in float32, also under `mixed_bfloat16` (`tfreward.models.layers.attention`).
"""

import math

import keras
import tensorflow as tf

from tfreward.models.layers.attention import merge_heads, multi_head_attention, split_heads
from tfreward.models.layers.mlp import MLP


def inverse_sigmoid(x, eps=1e-5):
  """Logit of x clipped to [0, 1] (float tensor of any shape), finite for 0 and 1."""
  x = tf.clip_by_value(x, 0.0, 1.0)
  return tf.math.log(tf.maximum(x, eps) / tf.maximum(1.0 - x, eps))


def _sine(coord, num_feats, temperature):
  """coord [...] float32 (already times 2 pi) -> [..., num_feats]: sin, cos interleaved over frequencies."""
  exponent = 2.0 * tf.cast(tf.range(num_feats) // 2, tf.float32) / float(num_feats)
  angles = coord[..., None] / tf.pow(float(temperature), exponent)  # [..., F]
  even = tf.sin(angles[..., 0::2])
  odd = tf.cos(angles[..., 1::2])
  return tf.reshape(tf.stack([even, odd], axis=-1), tf.concat([tf.shape(coord), [num_feats]], 0))


def sine_embed_for_position(points, dim, temperature=10000.0):
  """Sine embedding of normalised points.

  Args:
    points: [..., 2] float, (x, y) in [0, 1].
    dim: int. Even output width D; D / 2 features per coordinate.
    temperature: float. Defaults to 10000.

  Returns:
    [..., D] float32: (y features, x features).
  """
  if dim % 2:
    raise ValueError(f"dim must be even, got {dim!r}.")
  points = tf.cast(points, tf.float32) * (2.0 * math.pi)
  return tf.concat([_sine(points[..., 1], dim // 2, temperature), _sine(points[..., 0], dim // 2, temperature)], -1)


def sine_position_encoding(height, width, dim, temperature=10000.0):
  """DETR's 2D sine encoding of a full h x w feature grid: [h * w, D] float32, row-major, cell centres."""
  ys = (tf.range(height, dtype=tf.float32) + 0.5) / float(height)
  xs = (tf.range(width, dtype=tf.float32) + 0.5) / float(width)
  grid_y, grid_x = tf.meshgrid(ys, xs, indexing="ij")  # [h, w]
  points = tf.reshape(tf.stack([grid_x, grid_y], axis=-1), [height * width, 2])
  return sine_embed_for_position(points, dim, temperature)


class _Block(keras.layers.Layer):
  """Shared parts of the transformer layers: Dense factory, dropout, FFN."""

  def __init__(self, dim, num_heads, ffn_dim, dropout, **kwargs):
    super().__init__(**kwargs)
    if dim % num_heads:
      raise ValueError(f"dim must be a multiple of num_heads, got {dim!r} and {num_heads!r}.")
    self.dim, self.num_heads, self.ffn_dim, self.dropout_rate = int(dim), int(num_heads), int(ffn_dim), dropout
    self.drop = keras.layers.Dropout(dropout)
    self.ffn_in = keras.layers.Dense(ffn_dim, activation="relu", name="ffn_in")
    self.ffn_out = keras.layers.Dense(dim, name="ffn_out")

  def _dense(self, name):
    return keras.layers.Dense(self.dim, name=name)

  def _ffn(self, x, norm, training):
    return norm(x + self.drop(self.ffn_out(self.drop(self.ffn_in(x), training=training)), training=training))

  def get_config(self):
    config = super().get_config()
    config.update(dim=self.dim, num_heads=self.num_heads, ffn_dim=self.ffn_dim, dropout=self.dropout_rate)
    return config


class TransformerEncoderLayer(_Block):
  """Post-norm encoder layer. call(src [B, S, D], pos [S, D]) -> [B, S, D]."""

  def __init__(self, dim, num_heads, ffn_dim, dropout=0.1, **kwargs):
    super().__init__(dim, num_heads, ffn_dim, dropout, **kwargs)
    self.q, self.k, self.v, self.out = (self._dense(n) for n in ("q", "k", "v", "out"))
    self.norm1 = keras.layers.LayerNormalization(epsilon=1e-5, name="norm1")
    self.norm2 = keras.layers.LayerNormalization(epsilon=1e-5, name="norm2")

  def call(self, src, pos, training=False):
    with_pos = src + tf.cast(pos, src.dtype)
    attended = self.out(multi_head_attention(self.q(with_pos), self.k(with_pos), self.v(src), self.num_heads))
    src = self.norm1(src + self.drop(attended, training=training))
    return self._ffn(src, self.norm2, training)


class ConditionalDecoderLayer(_Block):
  """Conditional DETR decoder layer (post-norm), with Group DETR's group-wise self-attention.

  call(tgt [B, N, D], memory [B, S, D], pos [S, D], query_pos [N, D], query_sine [B, N, D], num_groups) ->
  [B, N, D]; N = num_groups * Q. `is_first`: the first layer also adds the projected query embedding to the
  cross-attention content query and the key positions to the content key (Conditional DETR).
  """

  def __init__(self, dim, num_heads, ffn_dim, dropout=0.1, is_first=False, **kwargs):
    super().__init__(dim, num_heads, ffn_dim, dropout, **kwargs)
    self.is_first = bool(is_first)
    names = ("sa_q_content", "sa_q_pos", "sa_k_content", "sa_k_pos", "sa_v", "sa_out",
             "ca_q_content", "ca_k_content", "ca_k_pos", "ca_v", "ca_q_sine", "ca_out")
    for name in names:
      setattr(self, name, self._dense(name))
    self.ca_q_pos = self._dense("ca_q_pos") if is_first else None
    self.norms = [keras.layers.LayerNormalization(epsilon=1e-5, name=f"norm{i + 1}") for i in range(3)]

  def _heads_concat(self, a, b):
    """[B, N, D] x 2 -> [B, N, 2D], head h holding (a_h, b_h)."""
    both = tf.concat([split_heads(a, self.num_heads), split_heads(b, self.num_heads)], axis=-1)  # [B, N, H, 2D/H]
    return merge_heads(both)

  def call(self, tgt, memory, pos, query_pos, query_sine, num_groups=1, training=False):
    query_pos = tf.cast(query_pos, tgt.dtype)[None]  # [1, N, D]
    # Self-attention within each group: [B, G*Q, D] -> [B*G, Q, D].
    q = self.sa_q_content(tgt) + self.sa_q_pos(query_pos)
    k = self.sa_k_content(tgt) + self.sa_k_pos(query_pos)
    v = self.sa_v(tgt)
    batch, num_total = tf.shape(tgt)[0], tgt.shape[1]
    if num_total % num_groups:
      raise ValueError(f"the {num_total} queries must split into num_groups={num_groups!r} equal groups.")
    grouped = [tf.reshape(t, [-1, num_total // num_groups, self.dim]) for t in (q, k, v)]  # [B*G, Q, D]
    attended = multi_head_attention(*grouped, self.num_heads)  # [B*G, Q, D]
    attended = tf.reshape(attended, [batch, num_total, self.dim])  # [B, G*Q, D]
    tgt = self.norms[0](tgt + self.drop(self.sa_out(attended), training=training))
    # Cross-attention: per head, (content, spatial) queries against (content, position) keys.
    key_pos = self.ca_k_pos(tf.cast(pos, memory.dtype)[None])  # [1, S, D]
    q = self.ca_q_content(tgt)
    k = self.ca_k_content(memory)
    if self.is_first:
      q = q + self.ca_q_pos(query_pos)
      k = k + key_pos
    q = self._heads_concat(q, self.ca_q_sine(tf.cast(query_sine, tgt.dtype)))  # [B, N, 2D]
    k = self._heads_concat(k, tf.broadcast_to(key_pos, tf.shape(k)))  # [B, S, 2D]
    attended = multi_head_attention(q, k, self.ca_v(memory), self.num_heads)  # [B, N, D]
    tgt = self.norms[1](tgt + self.drop(self.ca_out(attended), training=training))
    return self._ffn(tgt, self.norms[2], training)

  def get_config(self):
    config = super().get_config()
    config.update(is_first=self.is_first)
    return config


class ConditionalDecoder(keras.layers.Layer):
  """Stack of `ConditionalDecoderLayer`s with reference points and conditional spatial queries.

  call(memory [B, S, D], pos [S, D], query_pos [N, D], num_groups) ->
    hs: [L, B, N, D], every layer's output after the shared final LayerNorm;
    reference: [N, 2] float32 (x, y) reference points in (0, 1).
  """

  def __init__(self, dim, num_heads, ffn_dim, num_layers, dropout=0.1, **kwargs):
    super().__init__(**kwargs)
    self.dim, self.num_heads, self.ffn_dim = int(dim), int(num_heads), int(ffn_dim)
    self.num_layers, self.dropout_rate = int(num_layers), dropout
    self.decoder_layers = [ConditionalDecoderLayer(dim, num_heads, ffn_dim, dropout, is_first=i == 0,
                                                   name=f"layer{i}") for i in range(num_layers)]
    self.query_scale = MLP(dim, dim, 2, name="query_scale")
    self.ref_point_head = MLP(dim, 2, 2, name="ref_point_head")
    self.norm = keras.layers.LayerNormalization(epsilon=1e-5, name="norm")

  def call(self, memory, pos, query_pos, num_groups=1, training=False):
    query_pos = tf.cast(query_pos, memory.dtype)
    reference = tf.sigmoid(tf.cast(self.ref_point_head(query_pos), tf.float32))  # [N, 2]
    sine = tf.cast(sine_embed_for_position(reference, self.dim), memory.dtype)[None]  # [1, N, D]
    output = tf.zeros(tf.concat([tf.shape(memory)[:1], tf.shape(query_pos)], 0), memory.dtype)  # [B, N, D]
    hs = []
    for i, layer in enumerate(self.decoder_layers):
      query_sine = sine if i == 0 else sine * self.query_scale(output)  # [B, N, D]
      query_sine = tf.broadcast_to(query_sine, tf.shape(output))
      output = layer(output, memory, pos, query_pos, query_sine, num_groups=num_groups, training=training)
      hs.append(self.norm(output))
    return tf.stack(hs), reference

  def get_config(self):
    config = super().get_config()
    config.update(dim=self.dim, num_heads=self.num_heads, ffn_dim=self.ffn_dim, num_layers=self.num_layers,
                  dropout=self.dropout_rate)
    return config
