"""Pix2Seq building blocks: image encoders and an autoregressive Transformer decoder with a key/value cache.

Encoders map images `[B, H, W, 3]` (0..255) to a memory of feature tokens `[B, S, D]`:
  `ConvEncoder`    a small residual CNN (GroupNorm, so replicas never share batch statistics) plus Transformer
                   encoder layers; for the synthetic dataset.
  `ResNetEncoder`  `keras.applications.ResNet50(weights=None)` at stride 32, projected to D, plus Transformer encoder
                   layers; for COCO.
`SequenceDecoder` is a pre-LayerNorm Transformer decoder over the token vocabulary. Teacher forcing runs all positions
at once (`call`); decoding runs one position at a time (`step`) against a fixed-shape cache (`init_cache`): each
layer keeps `[B, L, heads, head_dim]` keys and values for its self-attention, written at position t and masked
beyond it, and the cross-attention keys and values of the memory, computed once.

Attention softmaxes run in float32 and the decoder returns float32 logits, also under `mixed_bfloat16`.
"""

import math

import keras
import tensorflow as tf

_MASKED = -1e9


def sincos(values, dims):
  """Fixed Fourier features of values in [0, 1]: [...] -> [..., dims] float32 (dims even), frequencies pi..100 pi.

  Used for the memory's 2-D positions and for the values of coordinate tokens, so that a decoder query can match a
  coordinate it has read against image positions from the first step of training.
  """
  freqs = math.pi * tf.exp(tf.linspace(0.0, math.log(100.0), dims // 2))  # [dims / 2]
  angles = tf.cast(values, tf.float32)[..., None] * freqs
  return tf.concat([tf.sin(angles), tf.cos(angles)], axis=-1)


def _build_all(sublayers, input_shape):
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

  def _heads(self, x):
    return tf.reshape(x, tf.concat([tf.shape(x)[:2], [self.num_heads, self.head_dim]], 0))  # [B, T, H, Dh]

  def keys_values(self, source):
    """source [B, S, D] -> keys, values [B, S, H, Dh] in the compute dtype."""
    return self._heads(self.key(source)), self._heads(self.value(source))

  def attend(self, x, keys, values, mask=None):
    """x [B, T, D] attends to keys, values [B, S, H, Dh]; mask bool broadcastable to [B, H, T, S] (True = visible)."""
    q = self._heads(self.query(x))  # [B, T, H, Dh]
    scores = tf.einsum("bthd,bshd->bhts", tf.cast(q, tf.float32), tf.cast(keys, tf.float32))
    scores *= 1.0 / math.sqrt(self.head_dim)
    if mask is not None:
      scores = tf.where(mask, scores, _MASKED)
    weights = tf.cast(tf.nn.softmax(scores, axis=-1), values.dtype)  # [B, H, T, S]
    out = tf.einsum("bhts,bshd->bthd", weights, values)
    return self.out(tf.reshape(out, tf.concat([tf.shape(out)[:2], [self.dim]], 0)))

  def call(self, x, source=None, mask=None):
    keys, values = self.keys_values(x if source is None else source)
    return self.attend(x, keys, values, mask)


class MLP(keras.layers.Layer):
  """Dense(hidden, gelu) -> Dense(dim)."""

  def __init__(self, dim, hidden, **kwargs):
    super().__init__(**kwargs)
    self.fc1 = keras.layers.Dense(hidden, activation="gelu", name="fc1")
    self.fc2 = keras.layers.Dense(dim, name="fc2")

  def build(self, input_shape):
    self.fc1.build(input_shape)
    self.fc2.build([*input_shape[:-1], self.fc1.units])

  def call(self, x):
    return self.fc2(self.fc1(x))


class EncoderBlock(keras.layers.Layer):
  """Pre-LayerNorm Transformer encoder layer: x + attn(ln(x)), then x + mlp(ln(x))."""

  def __init__(self, dim, num_heads, mlp_ratio=4, **kwargs):
    super().__init__(**kwargs)
    self.ln1 = keras.layers.LayerNormalization(epsilon=1e-6, name="ln1")
    self.attn = Attention(dim, num_heads, name="attn")
    self.ln2 = keras.layers.LayerNormalization(epsilon=1e-6, name="ln2")
    self.mlp = MLP(dim, dim * mlp_ratio, name="mlp")

  def build(self, input_shape):
    _build_all((self.ln1, self.attn, self.ln2, self.mlp), input_shape)

  def call(self, x):
    x = x + self.attn(self.ln1(x))
    return x + self.mlp(self.ln2(x))


class _TokenEncoder(keras.layers.Layer):
  """Shared tail: feature map [B, h, w, C] -> 1x1 projection, position embedding (fixed 2-D `sincos` of the cell
  centre plus a learned one), encoder layers."""

  def __init__(self, *, dim, num_layers, num_heads, mlp_ratio, **kwargs):
    super().__init__(**kwargs)
    self.dim = int(dim)
    self.project = keras.layers.Dense(dim, name="project")
    self.blocks = [EncoderBlock(dim, num_heads, mlp_ratio, name=f"block{i}") for i in range(num_layers)]
    self.ln = keras.layers.LayerNormalization(epsilon=1e-6, name="ln")

  def feature_hw(self, image_hw):
    """(H, W) of the images -> (h, w) of the feature map."""
    raise NotImplementedError

  def build(self, input_shape):
    h, w = self.feature_hw(input_shape[1:3])
    self.pos = self.add_weight(shape=(h * w, self.dim), name="pos_embedding",
                               initializer=keras.initializers.RandomNormal(stddev=0.02))

  def _tokens(self, features):
    h, w = features.shape[1], features.shape[2]
    x = tf.reshape(self.project(features), [-1, h * w, self.dim])  # [B, S, D]
    y_pos, x_pos = tf.meshgrid((tf.range(h, dtype=tf.float32) + 0.5) / h, (tf.range(w, dtype=tf.float32) + 0.5) / w,
                               indexing="ij")  # [h, w] cell centres
    fixed = tf.concat([sincos(y_pos, self.dim // 2), sincos(x_pos, self.dim - self.dim // 2)], axis=-1)
    x = x + tf.cast(self.pos + tf.reshape(fixed, [h * w, self.dim]), x.dtype)
    for block in self.blocks:
      x = block(x)
    return self.ln(x)


def normalize_images(images, dtype):
  """[B, H, W, 3] uint8/float 0..255 -> roughly zero-mean unit-variance `dtype`."""
  return (tf.cast(images, dtype) - tf.cast(127.5, dtype)) / tf.cast(64.0, dtype)


class ConvEncoder(_TokenEncoder):
  """Small residual CNN at stride 2**num_stages, then Transformer encoder layers.

  Args:
    dim: int. Memory width D.
    width: int. Channels of the first stage, doubled per stage up to 8 * width. Defaults to 32.
    num_stages: int. Stride-2 stages; the memory has (H / 2**num_stages) * (W / 2**num_stages) tokens. Defaults to 3.
    num_layers, num_heads, mlp_ratio: int. Transformer encoder layers on the tokens. Defaults to 1, 4, 4.

  Call: images [B, H, W, 3] uint8/float 0..255 -> memory [B, S, D] in the compute dtype.
  """

  def __init__(self, *, dim, width=32, num_stages=3, num_layers=1, num_heads=4, mlp_ratio=4, **kwargs):
    super().__init__(dim=dim, num_layers=num_layers, num_heads=num_heads, mlp_ratio=mlp_ratio, **kwargs)
    self.stages = []
    for i in range(num_stages):
      channels = width * 2 ** min(i, 3)
      self.stages.append([
          keras.layers.Conv2D(channels, 3, strides=2, padding="same", use_bias=False, name=f"down{i}"),
          keras.layers.GroupNormalization(min(8, channels), name=f"down{i}_gn"),
          keras.layers.Conv2D(channels, 3, padding="same", use_bias=False, name=f"res{i}"),
          keras.layers.GroupNormalization(min(8, channels), name=f"res{i}_gn"),
      ])

  def feature_hw(self, image_hw):
    stride = 2 ** len(self.stages)
    return tuple(-(-int(s) // stride) for s in image_hw)

  def call(self, images):
    x = normalize_images(images, self.compute_dtype)
    for down, down_gn, res, res_gn in self.stages:
      x = tf.nn.gelu(down_gn(down(x)))
      x = x + tf.nn.gelu(res_gn(res(x)))
    return self._tokens(x)


class ResNetEncoder(_TokenEncoder):
  """`keras.applications.ResNet50(weights=None)` features at stride 32, projected to D, then encoder layers.

  Args:
    dim: int. Memory width D.
    image_size: (int, int). Input height and width.
    num_layers, num_heads, mlp_ratio: int. Transformer encoder layers on the tokens. Defaults to 2, 8, 4.

  Call: images [B, H, W, 3] uint8/float 0..255 -> memory [B, (H / 32) * (W / 32), D].
  """

  def __init__(self, *, dim, image_size, num_layers=2, num_heads=8, mlp_ratio=4, **kwargs):
    super().__init__(dim=dim, num_layers=num_layers, num_heads=num_heads, mlp_ratio=mlp_ratio, **kwargs)
    self.backbone = keras.applications.ResNet50(include_top=False, weights=None,
                                                input_shape=(*image_size, 3))

  def feature_hw(self, image_hw):
    return tuple(int(s) for s in self.backbone.output_shape[1:3])

  def call(self, images):
    return self._tokens(self.backbone(normalize_images(images, self.compute_dtype)))


class DecoderBlock(keras.layers.Layer):
  """Pre-LayerNorm decoder layer: causal self-attention, cross-attention to the memory, MLP."""

  def __init__(self, dim, num_heads, mlp_ratio=4, **kwargs):
    super().__init__(**kwargs)
    self.ln1 = keras.layers.LayerNormalization(epsilon=1e-6, name="ln1")
    self.self_attn = Attention(dim, num_heads, name="self_attn")
    self.ln2 = keras.layers.LayerNormalization(epsilon=1e-6, name="ln2")
    self.cross_attn = Attention(dim, num_heads, name="cross_attn")
    self.ln3 = keras.layers.LayerNormalization(epsilon=1e-6, name="ln3")
    self.mlp = MLP(dim, dim * mlp_ratio, name="mlp")

  def build(self, input_shape):
    _build_all((self.ln1, self.self_attn, self.ln2, self.cross_attn, self.ln3, self.mlp), input_shape)

  def call(self, x, memory_kv, mask, cross_mask=None):
    """x [B, T, D]; memory_kv: cross-attention (keys, values); mask [T, T] causal; cross_mask [B, 1, T, S] or None."""
    h = self.ln1(x)
    x = x + self.self_attn.attend(h, *self.self_attn.keys_values(h), mask)
    x = x + self.cross_attn.attend(self.ln2(x), *memory_kv, cross_mask)
    return x + self.mlp(self.ln3(x))

  def step(self, x, position, cache, cross_mask=None):
    """One position: x [B, 1, D], position scalar int32, cache {k, v: [B, L, H, Dh], mem_k, mem_v}, cross_mask
    [B, 1, 1, S] or None."""
    h = self.ln1(x)
    k, v = self.self_attn.keys_values(h)  # [B, 1, H, Dh]
    positions = tf.range(cache["k"].shape[1])
    write = tf.equal(positions, position)[None, :, None, None]  # [1, L, 1, 1]
    cache = dict(cache, k=tf.where(write, k, cache["k"]), v=tf.where(write, v, cache["v"]))
    visible = (positions <= position)[None, :]  # [1, L]: this query sees positions 0..t
    x = x + self.self_attn.attend(h, cache["k"], cache["v"], visible)
    x = x + self.cross_attn.attend(self.ln2(x), cache["mem_k"], cache["mem_v"], cross_mask)
    return x + self.mlp(self.ln3(x)), cache


class SequenceDecoder(keras.layers.Layer):
  """Autoregressive Transformer decoder over box-slot token sequences, start token `bos_token = vocab_size`.

  A token's input embedding is learned, plus for coordinate tokens the fixed `sincos` features of the coordinate it
  stands for, repeated for both halves of the width (the geometry the encoder memory carries too). Symmetrically, the
  logits of coordinate tokens add `q . sincos(bin) / sqrt(D)` to the output layer's, with q a learned projection of
  the decoder state: nearby bins get similar logits from the start, so coordinates are learned as positions rather
  than as unrelated classes.

  Box-guided cross-attention (with `memory_hw`): the class and conf tokens of a slot (positions 6k + 4 and 6k + 5)
  attend only to the memory cells whose centres lie inside the slot's box, read from its four coordinate tokens
  (with half a cell of margin; all cells when none is inside). The decoder thus reads the class and the box quality
  where the box is, instead of having to learn where to look first, which speeds up training on small budgets.

  Args:
    vocab_size: int. Output tokens V (the input embedding has V + 1 rows: the last is the start token).
    seq_len: int. Longest sequence L (learned position embeddings).
    dim: int. Width D (a multiple of 4).
    num_layers, num_heads, mlp_ratio: int. Decoder layers, heads, MLP expansion.
    coord_tokens: optional (start, stop): the coordinate tokens, bins 0..stop - start - 1. Defaults to None (no
      coordinate features, no box guidance).
    memory_hw: optional (h, w): the memory is an h x w grid of cells in row-major order; enables box guidance (needs
      `coord_tokens`). Defaults to None.
  """

  def __init__(self, *, vocab_size, seq_len, dim, num_layers, num_heads, mlp_ratio=4, coord_tokens=None,
               memory_hw=None, **kwargs):
    super().__init__(**kwargs)
    if memory_hw is not None and coord_tokens is None:
      raise ValueError(f"box guidance (memory_hw={memory_hw!r}) needs coord_tokens, got None.")
    self.vocab_size, self.seq_len, self.dim = int(vocab_size), int(seq_len), int(dim)
    self.bos_token = self.vocab_size
    self.coord_tokens = None if coord_tokens is None else tuple(int(t) for t in coord_tokens)
    self.memory_hw = None if memory_hw is None else tuple(int(t) for t in memory_hw)
    self.embed = keras.layers.Embedding(vocab_size + 1, dim, name="embed",
                                        embeddings_initializer=keras.initializers.RandomNormal(stddev=0.02))
    self.pos = self.add_weight(shape=(seq_len, dim), name="pos_embedding",
                               initializer=keras.initializers.RandomNormal(stddev=0.02))
    self.blocks = [DecoderBlock(dim, num_heads, mlp_ratio, name=f"block{i}") for i in range(num_layers)]
    self.ln = keras.layers.LayerNormalization(epsilon=1e-6, name="ln")
    self.head = keras.layers.Dense(vocab_size, name="head")
    self.coord_query = keras.layers.Dense(dim, name="coord_query") if coord_tokens is not None else None

  def build(self, input_shape):
    self.embed.build(input_shape)
    _build_all((*self.blocks, self.ln, self.head) + ((self.coord_query,) if self.coord_query else ()),
               [None, None, self.dim])

  def _logits(self, x):
    """Decoder states [B, T, D] -> float32 logits [B, T, V]."""
    return self.head_logits(self.ln(x))

  def head_logits(self, h):
    """Normalised decoder states [B, T, D] (`call(..., return_features=True)`) -> float32 logits [B, T, V]."""
    logits = tf.cast(self.head(h), tf.float32)
    if self.coord_query is not None:
      start, stop = self.coord_tokens
      table = sincos(tf.linspace(0.0, 1.0, stop - start), self.dim)  # [n, D]
      query = tf.cast(self.coord_query(h), tf.float32)
      coord = tf.einsum("btd,nd->btn", query, table) * (1.0 / math.sqrt(self.dim))  # [B, T, n]
      logits += tf.pad(coord, [[0, 0], [0, 0], [start, self.vocab_size - stop]])
    return logits

  def _coord_values(self, tokens):
    """tokens [...] int32 -> (coordinate values [...] float32 in [0, 1], is-coordinate [...] bool)."""
    start, stop = self.coord_tokens
    value = tf.cast(tf.clip_by_value(tokens - start, 0, stop - start - 1), tf.float32) / float(stop - start - 1)
    return value, (tokens >= start) & (tokens < stop)

  def _embed(self, tokens):
    """tokens [...] int32 -> [..., D] in the compute dtype."""
    x = self.embed(tokens)
    if self.coord_tokens is not None:
      value, is_coord = self._coord_values(tokens)
      half = sincos(value, self.dim // 2)
      fixed = tf.concat([half, half], axis=-1) * tf.cast(is_coord, tf.float32)[..., None]
      x = x + tf.cast(fixed, x.dtype)
    return x

  def _box_cells(self, boxes):
    """boxes [..., 4] yxyx in [0, 1] -> [..., S] bool: memory cells inside (all cells when none is)."""
    h, w = self.memory_hw
    cy, cx = tf.meshgrid((tf.range(h, dtype=tf.float32) + 0.5) / h, (tf.range(w, dtype=tf.float32) + 0.5) / w,
                         indexing="ij")
    cy, cx = tf.reshape(cy, [-1]), tf.reshape(cx, [-1])  # [S]
    y0, x0, y1, x1 = (b[..., None] for b in tf.unstack(boxes, axis=-1))
    inside = ((cy >= tf.minimum(y0, y1) - 0.5 / h) & (cy <= tf.maximum(y0, y1) + 0.5 / h)
              & (cx >= tf.minimum(x0, x1) - 0.5 / w) & (cx <= tf.maximum(x0, x1) + 0.5 / w))
    return inside | ~tf.reduce_any(inside, axis=-1, keepdims=True)

  def shift_right(self, tokens):
    """Teacher-forcing inputs: [B, L] targets -> [B, L] int32 (start token, targets[:, :-1])."""
    tokens = tf.cast(tokens, tf.int32)
    return tf.concat([tf.fill([tf.shape(tokens)[0], 1], self.bos_token), tokens[:, :-1]], axis=1)

  def _teacher_cross_mask(self, inputs):
    """inputs [B, T] (T a multiple of 6) -> [B, 1, T, S] box-guidance mask."""
    length = inputs.shape[1]
    targets = tf.concat([inputs[:, 1:], inputs[:, :1]], axis=1)  # targets[t] = inputs[t + 1]; the last is unused
    coords = tf.reshape(targets, [-1, length // 6, 6])[..., :4]  # [B, T / 6, 4] tokens of each slot's box
    boxes = tf.repeat(self._coord_values(coords)[0], 6, axis=1)  # [B, T, 4]
    guided = (tf.range(length) % 6 >= 4)[None, :, None]  # class and conf positions
    return tf.where(guided, self._box_cells(boxes), True)[:, None]

  def call(self, inputs, memory, return_features=False):
    """Teacher forcing. inputs [B, T] int32 (T <= seq_len, start token first), memory [B, S, D] -> [B, T, V] float32
    logits; position t predicts the token after inputs[:, t]. Box guidance needs T to be a multiple of 6.
    With `return_features`, also the normalised states [B, T, D] the head reads (see `head_logits`)."""
    length = inputs.shape[1]
    x = self._embed(inputs) + tf.cast(self.pos[:length], self.compute_dtype)
    causal = tf.linalg.band_part(tf.ones([length, length], tf.bool), -1, 0)  # [T, T] lower triangle
    cross = self._teacher_cross_mask(inputs) if self.memory_hw is not None and length % 6 == 0 else None
    for block in self.blocks:
      x = block(x, block.cross_attn.keys_values(memory), causal, cross)
    if return_features:
      h = self.ln(x)
      return self.head_logits(h), h
    return self._logits(x)

  def init_cache(self, memory):
    """memory [B, S, D] -> cache: per layer {k, v: [B, L, H, Dh] zeros, mem_k, mem_v: [B, S, H, Dh]}, and `box`
    [B, 4] float32, the coordinates read so far in the current slot."""
    batch = tf.shape(memory)[0]
    cache = {"box": tf.zeros([batch, 4], tf.float32)}
    for i, block in enumerate(self.blocks):
      mem_k, mem_v = block.cross_attn.keys_values(memory)
      attn = block.self_attn
      zeros = tf.zeros([batch, self.seq_len, attn.num_heads, attn.head_dim], mem_k.dtype)
      cache[f"layer{i}"] = {"k": zeros, "v": zeros, "mem_k": mem_k, "mem_v": mem_v}
    return cache

  def step(self, tokens, position, cache):
    """One decoding step. tokens [B] int32 (the previous token, or the start token at position 0), position scalar
    int32 -> (logits [B, V] float32 for the token at `position`, updated cache)."""
    x = self._embed(tokens[:, None]) + tf.cast(tf.gather(self.pos, position), self.compute_dtype)  # [B, 1, D]
    new_cache = {"box": cache["box"]}
    cross = None
    if self.memory_hw is not None:
      previous = position - 1  # `tokens` sits at this position; coordinates 0..3 of its slot go into the box
      write = tf.equal(tf.range(4), previous % 6) & (previous >= 0)  # [4]
      new_cache["box"] = tf.where(write[None, :], self._coord_values(tokens)[0][:, None], cache["box"])
      guided = position % 6 >= 4
      cross = tf.where(guided, self._box_cells(new_cache["box"]), True)[:, None, None, :]  # [B, 1, 1, S]
    for i, block in enumerate(self.blocks):
      x, new_cache[f"layer{i}"] = block.step(x, position, cache[f"layer{i}"], cross)
    return self._logits(x)[:, 0], new_cache
