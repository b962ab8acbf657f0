"""Autoregressive sampling inside XLA: a `tf.while_loop` over positions with a fixed-shape cache.

`sample_sequences` drives any one-position decoder `step_fn(tokens, position, cache) -> (logits, cache)`: it repeats
each image's cache N times (N samples per image in one call), and at each position t

  1. divides the logits by `temperature`,
  2. keeps only the tokens of position t's kind (coordinate, class or conf; `sequence.allowed_tokens` row t, the
     per-position form of `sequence.constrain_logits`),
  3. keeps the `top_k` most likely tokens and the smallest set reaching probability `top_p` (nucleus),
  4. draws a token with the Gumbel-max trick from stateless Philox noise seeded by `fold_in(seed, t)` (or takes the
     argmax when `greedy`); the noise (`stateless_uniform`) is bit-identical eagerly and under XLA.

Everything is static-shape: the loop runs exactly L steps and writes into fixed-size TensorArrays, so it compiles with
`jit_compile=True`; the same seed gives the same tokens eagerly and under XLA.
"""

import numbers

import tensorflow as tf

from tfreward.ops import sequence

_LOWEST = tf.float32.min


def _check(name, value, ok, what):
  if isinstance(value, bool) or not ok:
    raise ValueError(f"{name} must be {what}, got {value!r}.")


def filter_logits(logits, *, temperature=1.0, top_k=0, top_p=1.0):
  """Temperature, top-k and top-p (nucleus) filtering; removed tokens get the lowest float32 value.

  Args:
    logits: [R, V] float logits (already constrained: disallowed tokens at a very low value).
    temperature: float > 0. Defaults to 1.0.
    top_k: int >= 0. Keep the k largest logits (ties with the k-th kept); 0 keeps all. Defaults to 0.
    top_p: float in (0, 1]. Keep the most likely tokens whose cumulative probability, before adding each, is below
      top_p (the most likely token always stays); 1.0 keeps all. Defaults to 1.0.

  Returns:
    [R, V] float32 filtered logits.
  """
  _check("temperature", temperature, isinstance(temperature, numbers.Real) and temperature > 0, "a float > 0")
  _check("top_k", top_k, isinstance(top_k, numbers.Integral) and top_k >= 0, "an int >= 0")
  _check("top_p", top_p, isinstance(top_p, numbers.Real) and 0 < top_p <= 1, "a float in (0, 1]")
  logits = tf.cast(logits, tf.float32)
  if temperature != 1.0:
    low = logits <= _LOWEST / 2  # keep removed tokens at the lowest value instead of overflowing to -inf
    logits = tf.where(low, _LOWEST, logits / float(temperature))
  if top_k and top_k < logits.shape[-1]:
    kth = tf.math.top_k(logits, k=int(top_k)).values[:, -1:]  # [R, 1]
    logits = tf.where(logits >= kth, logits, _LOWEST)
  if top_p < 1.0:
    ordered = tf.sort(logits, axis=-1, direction="DESCENDING")  # [R, V]
    probs = tf.nn.softmax(ordered, axis=-1)
    before = tf.cumsum(probs, axis=-1, exclusive=True)  # probability of the tokens ranked above each one
    keep = before < float(top_p)
    threshold = tf.reduce_min(tf.where(keep, ordered, tf.float32.max), axis=-1, keepdims=True)  # [R, 1]
    logits = tf.where(logits >= threshold, logits, _LOWEST)
  return logits


def _fmix32(x):
  """MurmurHash3's 32-bit finaliser: a bijection of uint32 with full avalanche."""
  x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, tf.constant(16, tf.uint32)))
  x = x * tf.constant(0x85EBCA6B, tf.uint32)
  x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, tf.constant(13, tf.uint32)))
  x = x * tf.constant(0xC2B2AE35, tf.uint32)
  return tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, tf.constant(16, tf.uint32)))


def _words(value):
  """int32/int64 tensor -> its int64 values as uint32 words, [..., 2 * n] flattened to 1-D."""
  return tf.reshape(tf.bitcast(tf.cast(tf.convert_to_tensor(value), tf.int64), tf.uint32), [-1])


def _hash(index, key):
  """Keyed counter hash: uint32 index -> uint32, four MurmurHash3 finaliser rounds keyed by 4 uint32 words."""
  x = _fmix32(index * tf.constant(0x9E3779B9, tf.uint32) + key[0])
  x = _fmix32(tf.bitwise.bitwise_xor(x, key[1]))
  x = _fmix32(x + key[2])
  return _fmix32(tf.bitwise.bitwise_xor(x, key[3]))


def fold_in(seed, data):
  """A new [2] int64 seed from `seed` ([2] int) and an int scalar `data`, identical eagerly and under XLA.

  (`tf.random.experimental.stateless_fold_in` and `stateless_split` agree in both modes only while their seed is a
  compile-time constant.)
  """
  key, extra = _words(seed), _words(data)  # [4], [2]
  salt = _fmix32(extra + tf.constant([0x85EBCA77, 0xC2B2AE3D], tf.uint32))
  key = tf.stack([key[0], tf.bitwise.bitwise_xor(key[1], salt[0]), key[2], tf.bitwise.bitwise_xor(key[3], salt[1])])
  return tf.bitcast(tf.reshape(_hash(tf.cast(tf.range(4), tf.uint32), key), [2, 2]), tf.int64)


def split(seed, num):
  """`num` independent [2] int64 seeds from `seed`: [num, 2], `fold_in(seed, i)` for i < num."""
  return tf.stack([fold_in(seed, i) for i in range(num)])


def stateless_uniform(shape, seed, minval=0.0, maxval=1.0):
  """Uniform float32 noise in [minval, maxval), bit-identical eagerly, under XLA and on any device.

  `tf.random.stateless_uniform` is not: its XLA lowering of Philox draws other numbers than its CPU kernel for the
  same (computed) seed. Here element i gets a keyed counter hash of i in exact uint32 arithmetic: four rounds of
  MurmurHash3's finaliser, each after mixing in one 32-bit word of the seed (a bijection of i for every seed, so no
  two elements of one draw collide); its top 24 bits make the float. Not cryptographic; ample for sampling. Derive
  seeds with `fold_in` and `split` here.

  Args:
    shape: 1-D int shape.
    seed: [2] int32/int64 stateless seed.
    minval, maxval: float. Defaults to 0.0 and 1.0.

  Returns:
    float32 tensor of `shape`.
  """
  shape = tf.cast(tf.convert_to_tensor(shape), tf.int32)
  x = _hash(tf.cast(tf.range(tf.reduce_prod(shape)), tf.uint32), _words(seed))
  u = tf.cast(tf.bitwise.right_shift(x, tf.constant(8, tf.uint32)), tf.float32) * (1.0 / (1 << 24))
  return tf.reshape(minval + (maxval - minval) * u, shape)


def gumbel_sample(logits, seed):
  """One token per row from softmax(logits): argmax(logits + Gumbel noise), noise from `stateless_uniform`.

  Args:
    logits: [R, V] float32.
    seed: [2] int32/int64 stateless seed.

  Returns:
    [R] int32 tokens.
  """
  u = tf.maximum(stateless_uniform(tf.shape(logits), seed), 1e-20)
  return tf.argmax(logits - tf.math.log(-tf.math.log(u)), axis=-1, output_type=tf.int32)


def sample_sequences(step_fn, cache, *, seq_len, max_level, max_conf, num_cls, start_token, num_samples=1,
                     seed=None, greedy=False, temperature=1.0, top_k=0, top_p=1.0, return_logits=False):
  """Samples `num_samples` token sequences per image with a cached one-position decoder, in one `tf.while_loop`.

  Args:
    step_fn: callable `(tokens [R] int32, position scalar int32, cache) -> (logits [R, V] float, cache)` with
      R = B * num_samples; `tokens` is the previous token (`start_token` at position 0). The cache keeps its
      structure and shapes.
    cache: nested structure of tensors, each with leading dimension B (one entry per image). Row b * N + n of the
      repeated cache belongs to sample n of image b.
    seq_len: int. Number of positions L.
    max_level, max_conf, num_cls: int. The `sequence.TokenLayout`; V must be its vocab_size.
    start_token: int. Input token of position 0.
    num_samples: int >= 1. N. Defaults to 1.
    seed: [2] int32/int64 stateless seed (a tensor or two ints); required unless `greedy`. Position t uses
      `fold_in(seed, t)`, so different positions and rows draw independent noise.
    greedy: bool. Take the most likely allowed token (temperature, top-k and top-p do not change it). Defaults to
      False.
    temperature, top_k, top_p: see `filter_logits`.
    return_logits: bool. Also return the step logits. Defaults to False.

  Returns:
    dict with
      tokens: [B, N, L] int32; each position holds a token of its kind (`sequence.token_kinds`).
      logits: [B, N, L, V] float32 raw step logits (before temperature, constraints and filtering), if
        `return_logits`.
  """
  _check("seq_len", seq_len, isinstance(seq_len, numbers.Integral) and seq_len >= 1, "an int >= 1")
  _check("num_samples", num_samples, isinstance(num_samples, numbers.Integral) and num_samples >= 1, "an int >= 1")
  layout = sequence.TokenLayout(max_level, max_conf, num_cls)
  if not greedy and seed is None:
    raise ValueError("sampling needs a seed (a [2] int tensor); got seed=None with greedy=False.")
  filter_logits(tf.zeros([1, 1]), temperature=temperature, top_k=top_k, top_p=top_p)  # validates the options
  allowed = sequence.allowed_tokens(int(seq_len), max_level=max_level, max_conf=max_conf, num_cls=num_cls)  # [L, V]
  first = tf.nest.flatten(cache)[0]
  batch = first.shape[0] if first.shape[0] is not None else tf.shape(first)[0]
  cache = tf.nest.map_structure(lambda x: tf.repeat(x, num_samples, axis=0), cache)
  rows = batch * num_samples
  seed = None if greedy else tf.cast(tf.convert_to_tensor(seed), tf.int64)

  def body(position, previous, cache, tokens, logits_out):
    logits, cache = step_fn(previous, position, cache)
    logits = tf.ensure_shape(tf.cast(logits, tf.float32), [None, layout.vocab_size])
    constrained = tf.where(tf.gather(allowed, position)[None, :], logits, _LOWEST)  # [R, V]
    if greedy:
      token = tf.argmax(constrained, axis=-1, output_type=tf.int32)
    else:
      filtered = filter_logits(constrained, temperature=temperature, top_k=top_k, top_p=top_p)
      token = gumbel_sample(filtered, fold_in(seed, position))
    tokens = tokens.write(position, token)
    if return_logits:
      logits_out = logits_out.write(position, logits)
    return position + 1, token, cache, tokens, logits_out

  tokens = tf.TensorArray(tf.int32, size=seq_len, element_shape=[None])
  logits_out = tf.TensorArray(tf.float32, size=seq_len if return_logits else 0,
                              element_shape=[None, layout.vocab_size])
  start = tf.fill([rows], tf.cast(start_token, tf.int32))
  _, _, _, tokens, logits_out = tf.while_loop(
      lambda position, *_: position < seq_len, body, (tf.constant(0), start, cache, tokens, logits_out),
      maximum_iterations=seq_len)
  out = {"tokens": tf.reshape(tf.transpose(tokens.stack()), [batch, num_samples, seq_len])}
  if return_logits:
    logits = tf.transpose(logits_out.stack(), [1, 0, 2])  # [R, L, V]
    out["logits"] = tf.reshape(logits, [batch, num_samples, seq_len, layout.vocab_size])
  return out
