"""Pix2Seq's Transformer layers: cached multi-head attention, pre-LayerNorm encoder and decoder blocks.

`Attention` projects keys and values separately from queries, so a decoder can cache them: `keys_values` once per
source, `attend` per query (heads and softmax: `tfreward.models.layers.attention`). Blocks take and return
[B, T, D] in the compute dtype; attention softmaxes run in float32, also under `mixed_bfloat16`.
"""

import math

import keras
import tensorflow as tf

from tfreward.models.layers.attention import dot_product_attention, heads_first, merge_heads, split_heads
from tfreward.models.layers.mlp import MLP


def sincos(values, dims):
  """Fixed Fourier features of values in [0, 1]: [...] -> [..., dims] float32 (dims even), frequencies pi..100 pi.

  Used for the memory's 2-D positions and for the values of coordinate tokens, so that a decoder query can match a
  coordinate it has read against image positions from the first step of training.
  """
  freqs = math.pi * tf.exp(tf.linspace(0.0, math.log(100.0), dims // 2))  # [dims / 2]
  angles = tf.cast(values, tf.float32)[..., None] * freqs
  return tf.concat([tf.sin(angles), tf.cos(angles)], axis=-1)


def build_all(sublayers, input_shape):
  """Builds sublayers that all take [..., D] inputs."""
  for layer in sublayers:
    layer.build(input_shape)


class Attention(keras.layers.Layer):
  """Multi-head dot-product attention with separate key/value projection, so keys and values can be cached.

  Args:
    dim: int. Model width D (a multiple of num_heads).
    num_heads: int. Number of heads H.
  """

  def __init__(self, dim, num_heads, **kwargs):
    super().__init__(**kwargs)
    if dim % num_heads:
      raise ValueError(f"dim must be a multiple of num_heads, got dim={dim!r}, num_heads={num_heads!r}.")
    self.dim, self.num_heads, self.head_dim = int(dim), int(num_heads), int(dim) // int(num_heads)
    self.query = keras.layers.Dense(dim, name="query")
    self.key = keras.layers.Dense(dim, name="key")
    self.value = keras.layers.Dense(dim, name="value")
    self.out = keras.layers.Dense(dim, name="out")

  def build(self, input_shape):
    for dense in (self.query, self.key, self.value, self.out):
      dense.build([None, None, self.dim])

  def keys_values(self, source, *, kv_heads_first=False):
    """source [B, S, D] -> keys, values [B, S, H, Dh] ([B, H, S, Dh] with `kv_heads_first`), compute dtype."""
    keys, values = split_heads(self.key(source), self.num_heads), split_heads(self.value(source), self.num_heads)
    return (heads_first(keys), heads_first(values)) if kv_heads_first else (keys, values)

  def attend(self, x, keys, values, mask=None, *, kv_heads_first=False):
    """x [B * G, T, D] attends to keys, values [B, S, H, Dh] (or [B, H, S, Dh] with `kv_heads_first`).

    G >= 1 consecutive rows of x share one source (the G samples of one image): their queries attend together, so
    the source's keys and values are projected and read once, not G times. mask: bool, broadcastable to
    [B * G, H, T, S] (True = visible); a per-row mask has shape [B * G, 1, T, S].
    """
    rows = tf.shape(x)[0]
    grouped = tf.reshape(x, [tf.shape(keys)[0], -1, self.dim])  # [B, G * T, D], rows (g, t) in order
    if mask is not None and mask.shape.rank == 4 and mask.shape[0] != 1:
      mask = tf.reshape(mask, [tf.shape(keys)[0], 1, -1, mask.shape[-1]])  # [B, 1, G * T, S]
    heads = dot_product_attention(split_heads(self.query(grouped), self.num_heads), keys, values, mask,
                                  kv_heads_first=kv_heads_first)  # [B, G * T, H, Dh]
    return tf.reshape(self.out(merge_heads(heads)), tf.shape(x))

  def call(self, x, source=None, mask=None):
    keys, values = self.keys_values(x if source is None else source)
    return self.attend(x, keys, values, mask)


class EncoderBlock(keras.layers.Layer):
  """Pre-LayerNorm Transformer encoder layer: x + attn(ln(x)), then x + mlp(ln(x))."""

  def __init__(self, dim, num_heads, mlp_ratio=4, **kwargs):
    super().__init__(**kwargs)
    self.ln1 = keras.layers.LayerNormalization(epsilon=1e-6, name="ln1")
    self.attn = Attention(dim, num_heads, name="attn")
    self.ln2 = keras.layers.LayerNormalization(epsilon=1e-6, name="ln2")
    self.mlp = MLP(dim * mlp_ratio, dim, 2, activation="gelu", name="mlp")

  def build(self, input_shape):
    build_all((self.ln1, self.attn, self.ln2, self.mlp), input_shape)

  def call(self, x):
    x = x + self.attn(self.ln1(x))
    return x + self.mlp(self.ln2(x))


class DecoderBlock(keras.layers.Layer):
  """Pre-LayerNorm decoder layer: causal self-attention, cross-attention to the memory, MLP."""

  def __init__(self, dim, num_heads, mlp_ratio=4, **kwargs):
    super().__init__(**kwargs)
    self.ln1 = keras.layers.LayerNormalization(epsilon=1e-6, name="ln1")
    self.self_attn = Attention(dim, num_heads, name="self_attn")
    self.ln2 = keras.layers.LayerNormalization(epsilon=1e-6, name="ln2")
    self.cross_attn = Attention(dim, num_heads, name="cross_attn")
    self.ln3 = keras.layers.LayerNormalization(epsilon=1e-6, name="ln3")
    self.mlp = MLP(dim * mlp_ratio, dim, 2, activation="gelu", name="mlp")

  def build(self, input_shape):
    build_all((self.ln1, self.self_attn, self.ln2, self.cross_attn, self.ln3, self.mlp), input_shape)

  def call(self, x, memory_kv, mask, cross_mask=None):
    """x [B, T, D]; memory_kv: cross-attention (keys, values); mask [T, T] causal; cross_mask [B, 1, T, S] or None."""
    h = self.ln1(x)
    x = x + self.self_attn.attend(h, *self.self_attn.keys_values(h), mask)
    x = x + self.cross_attn.attend(self.ln2(x), *memory_kv, cross_mask)
    return x + self.mlp(self.ln3(x))

  def step(self, x, position, cache, memory_kv, cross_mask=None):
    """One position: x [B * G, 1, D], position scalar int32, cache {k, v: [B * G, H, L, Dh]} (heads first),
    memory_kv: cross-attention (keys, values) [B, H, S, Dh] of the B sources, cross_mask [B * G, 1, 1, S] or None."""
    h = self.ln1(x)
    k, v = self.self_attn.keys_values(h, kv_heads_first=True)  # [B * G, H, 1, Dh]
    positions = tf.range(cache["k"].shape[2])
    write = tf.equal(positions, position)[None, None, :, None]  # [1, 1, L, 1]
    cache = dict(cache, k=tf.where(write, k, cache["k"]), v=tf.where(write, v, cache["v"]))
    visible = (positions <= position)[None, :]  # [1, L]: this query sees positions 0..t
    x = x + self.self_attn.attend(h, cache["k"], cache["v"], visible, kv_heads_first=True)
    x = x + self.cross_attn.attend(self.ln2(x), *memory_kv, cross_mask, kv_heads_first=True)
    return x + self.mlp(self.ln3(x)), cache
