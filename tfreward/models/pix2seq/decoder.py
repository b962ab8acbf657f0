"""Pix2Seq's autoregressive Transformer decoder with a key/value cache, and decoding with it.

Teacher forcing runs all positions at once (`SequenceDecoder.call`); decoding runs one position at a time
(`step`) against a fixed-shape cache (`init_cache`): each layer keeps [B, heads, L, head_dim] keys and values for
its self-attention, written at position t and masked beyond it; the cross-attention keys and values of the memory
are computed once per image (`memory_keys_values`), and the N samples of an image attend to them together. `decode` drives `step` inside one `tf.while_loop` (`tfreward.ops.sampling`). The decoder
returns float32 logits, also under `mixed_bfloat16`.
"""

import functools
import math

import keras
import tensorflow as tf

from tfreward.models.pix2seq.layers import DecoderBlock, build_all, sincos
from tfreward.ops import sampling


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
    build_all((*self.blocks, self.ln, self.head) + ((self.coord_query,) if self.coord_query else ()),
              [None, None, self.dim])

  def _logits(self, x):
    """Decoder states [B, T, D] -> float32 logits [B, T, V]."""
    h = self.ln(x)
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

  def call(self, inputs, memory):
    """Teacher forcing. inputs [B * G, T] int32 (T <= seq_len, start token first; G >= 1 consecutive sequences per
    image, e.g. its samples), memory [B, S, D] -> [B * G, T, V] float32 logits; position t predicts the token after
    inputs[:, t]. Box guidance needs T to be a multiple of 6."""
    length = inputs.shape[1]
    x = self._embed(inputs) + tf.cast(self.pos[:length], self.compute_dtype)
    causal = tf.linalg.band_part(tf.ones([length, length], tf.bool), -1, 0)  # [T, T] lower triangle
    cross = self._teacher_cross_mask(inputs) if self.memory_hw is not None and length % 6 == 0 else None
    for block in self.blocks:
      x = block(x, block.cross_attn.keys_values(memory), causal, cross)
    return self._logits(x)

  def memory_keys_values(self, memory):
    """memory [B, S, D] -> per layer the cross-attention (keys, values) [B, H, S, Dh], computed once per decoding."""
    return [block.cross_attn.keys_values(memory, kv_heads_first=True) for block in self.blocks]

  def init_cache(self, memory):
    """memory [B, S, D] -> cache: per layer {k, v: [B, H, L, Dh] zeros}, the self-attention's keys and values, and
    `box` [B, 4] float32, the coordinates read so far in the current slot."""
    batch = tf.shape(memory)[0]
    cache = {"box": tf.zeros([batch, 4], tf.float32)}
    for i, block in enumerate(self.blocks):
      attn = block.self_attn
      zeros = tf.zeros([batch, attn.num_heads, self.seq_len, attn.head_dim], self.compute_dtype)
      cache[f"layer{i}"] = {"k": zeros, "v": zeros}
    return cache

  def step(self, tokens, position, cache, memory_kv):
    """One decoding step. tokens [B * G] int32 (the previous token, or the start token at position 0; G >= 1 rows
    per image), position scalar int32, cache of `init_cache` with B * G rows, memory_kv of `memory_keys_values`
    (B images) -> (logits [B * G, V] float32 for the token at `position`, updated cache)."""
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
      x, new_cache[f"layer{i}"] = block.step(x, position, cache[f"layer{i}"], memory_kv[i], cross)
    return self._logits(x)[:, 0], new_cache


def decode(decoder, memory, sampling_options, *, layout, num_samples=1, seed=None, return_logits=False):
  """Decodes `num_samples` sequences per image from memory [B, S, D] inside one `tf.while_loop`.

  Args:
    decoder: a `SequenceDecoder`.
    memory: [B, S, D] encoder memory.
    sampling_options: `options.SamplingOptions` (greedy, or temperature / top-k / top-p).
    layout: dict max_level, max_conf, num_cls (the `sequence.TokenLayout`).
    num_samples: int N. Defaults to 1.
    seed: [2] int stateless seed; required unless greedy.
    return_logits: bool. Also return the raw step logits. Defaults to False.

  Returns:
    dict tokens [B, N, L] int32 (+ logits [B, N, L, V] float32); see `sampling.sample_sequences`.
  """
  o = sampling_options
  memory_kv = decoder.memory_keys_values(memory)  # per image: the N samples of an image read it together
  return sampling.sample_sequences(
      functools.partial(decoder.step, memory_kv=memory_kv), decoder.init_cache(memory), seq_len=decoder.seq_len,
      start_token=decoder.bos_token,
      num_samples=num_samples, seed=seed, greedy=o.greedy, temperature=o.temperature, top_k=o.top_k, top_p=o.top_p,
      return_logits=return_logits, **layout)
