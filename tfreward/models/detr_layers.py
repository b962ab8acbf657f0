"""Conditional DETR building blocks (Meng et al., 2021): backbones, sine encodings, encoder, conditional decoder.

Backbones take images [B, H, W, 3] (0..255) and return one feature map [B, h, w, C]:
  `SmallBackbone`    a residual CNN with GroupNorm (replicas never share statistics) at stride 2**num_stages, for
                     the CPU-sized synthetic dataset;
  `ResNet50Backbone` keras.applications.ResNet50 (`weights=None`, or "imagenet" when the weights are available) at
                     stride 32 with frozen BatchNorm, as DETR's FrozenBatchNorm2d; caffe preprocessing (BGR minus
                     the ImageNet mean), as Keras' ImageNet weights expect.

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

Softmaxes run in float32, also under `mixed_bfloat16`.
"""

import math

import keras
import tensorflow as tf

PRIOR_PROB = 0.01
BACKBONES = ("small_cnn", "resnet50")
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
_IMAGENET_MEAN = (123.675, 116.28, 103.53)
_IMAGENET_STD = (58.395, 57.12, 57.375)


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


def attention(q, k, v, num_heads):
  """Multi-head scaled dot-product attention on projected inputs.

  Args:
    q: [B, Nq, Dk] queries; k: [B, Nk, Dk] keys; v: [B, Nk, Dv] values; Dk and Dv multiples of num_heads.
      Head h reads channels [h * Dk / H, (h + 1) * Dk / H) of q and k.
    num_heads: int H.

  Returns:
    [B, Nq, Dv] in the dtype of v (softmax in float32).
  """
  def heads(x):
    return tf.reshape(x, tf.concat([tf.shape(x)[:2], [num_heads, x.shape[-1] // num_heads]], 0))  # [B, N, H, d]
  qh, kh, vh = heads(q), heads(k), heads(v)
  logits = tf.einsum("bqhd,bkhd->bhqk", qh, kh) * tf.cast((q.shape[-1] // num_heads) ** -0.5, q.dtype)
  weights = tf.cast(tf.nn.softmax(tf.cast(logits, tf.float32), axis=-1), v.dtype)
  out = tf.einsum("bhqk,bkhd->bqhd", weights, vh)
  return tf.reshape(out, tf.concat([tf.shape(v)[:1], tf.shape(q)[1:2], [v.shape[-1]]], 0))


class MLP(keras.layers.Layer):
  """`num_layers` Dense layers, ReLU between them: [..., Din] -> [..., output_dim].

  Args:
    hidden_dim, output_dim, num_layers: int.
    zero_last: bool. Zero weights and bias in the last layer (DETR's box head init). Defaults to False.
  """

  def __init__(self, hidden_dim, output_dim, num_layers, zero_last=False, **kwargs):
    super().__init__(**kwargs)
    self.hidden_dim, self.output_dim, self.num_layers = int(hidden_dim), int(output_dim), int(num_layers)
    self.zero_last = bool(zero_last)
    init = dict(kernel_initializer="zeros", bias_initializer="zeros") if zero_last else {}
    self.dense = [keras.layers.Dense(hidden_dim, activation="relu", name=f"dense{i}") for i in range(num_layers - 1)]
    self.dense.append(keras.layers.Dense(output_dim, name=f"dense{num_layers - 1}", **init))

  def call(self, x):
    for dense in self.dense:
      x = dense(x)
    return x

  def get_config(self):
    config = super().get_config()
    config.update(hidden_dim=self.hidden_dim, output_dim=self.output_dim, num_layers=self.num_layers,
                  zero_last=self.zero_last)
    return config


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
    attended = self.out(attention(self.q(with_pos), self.k(with_pos), self.v(src), self.num_heads))
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
    shape = tf.concat([tf.shape(a)[:2], [self.num_heads, self.dim // self.num_heads]], 0)
    both = tf.concat([tf.reshape(a, shape), tf.reshape(b, shape)], axis=-1)  # [B, N, H, 2D/H]
    return tf.reshape(both, tf.concat([tf.shape(a)[:2], [2 * self.dim]], 0))

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
    attended = tf.reshape(attention(*grouped, self.num_heads), [batch, num_total, self.dim])  # [B, G*Q, D]
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
    attended = attention(q, k, self.ca_v(memory), self.num_heads)  # [B, N, D]
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


class SmallBackbone(keras.layers.Layer):
  """Residual CNN: per stage a stride-2 3x3 conv and a residual 3x3 conv, each GroupNorm + ReLU.

  Channels width * 2**i, capped at 4 * width. [B, H, W, 3] 0..255 -> [B, H / 2**s, W / 2**s, C] (ceil).

  Args:
    width: int. Channels of the first stage. Defaults to 32.
    num_stages: int. Stride-2 stages s. Defaults to 4.
  """

  def __init__(self, width=32, num_stages=4, **kwargs):
    super().__init__(**kwargs)
    self.width, self.num_stages = int(width), int(num_stages)
    self.stages = []
    for i in range(self.num_stages):
      channels = self.width * 2 ** min(i, 2)
      groups = math.gcd(8, channels)
      self.stages.append((
          keras.layers.Conv2D(channels, 3, strides=2, padding="same", use_bias=False, name=f"down{i}"),
          keras.layers.GroupNormalization(groups, epsilon=1e-5, name=f"down{i}_gn"),
          keras.layers.Conv2D(channels, 3, padding="same", use_bias=False, name=f"res{i}"),
          keras.layers.GroupNormalization(groups, epsilon=1e-5, name=f"res{i}_gn")))

  @property
  def channels(self):
    return self.width * 2 ** min(self.num_stages - 1, 2)

  def call(self, images, training=False):
    x = tf.cast(images, self.compute_dtype)
    x = (x - tf.constant(_IMAGENET_MEAN, x.dtype)) / tf.constant(_IMAGENET_STD, x.dtype)
    for down, down_gn, res, res_gn in self.stages:
      x = tf.nn.relu(down_gn(down(x)))
      x = tf.nn.relu(x + res_gn(res(x)))
    return x

  def get_config(self):
    config = super().get_config()
    config.update(width=self.width, num_stages=self.num_stages)
    return config


class ResNet50Backbone(keras.layers.Layer):
  """keras.applications.ResNet50 without its top: [B, H, W, 3] -> [B, H / 32, W / 32, 2048].

  As DETR's backbone: BatchNorm frozen (moving statistics, gamma and beta fixed), stem and first stage not trained.

  Args:
    image_size: (int, int). Static input height and width.
    weights: None (random initialisation) or "imagenet" (Keras' ImageNet weights; needs them cached or a
      download). Defaults to None.
  """

  channels = 2048

  def __init__(self, image_size, weights=None, **kwargs):
    super().__init__(**kwargs)
    if weights not in (None, "imagenet"):
      raise ValueError(f"weights must be None or 'imagenet', got {weights!r}.")
    self.image_size = tuple(int(s) for s in image_size)
    self.weights_name = weights
    self.resnet = keras.applications.ResNet50(include_top=False, weights=weights, input_shape=(*self.image_size, 3))
    for layer in self.resnet.layers:
      # Keras 3: a non-trainable BatchNormalization runs in inference mode. DETR also freezes the stem and stage 1.
      if isinstance(layer, keras.layers.BatchNormalization) or layer.name.startswith(("conv1_", "conv2_")):
        layer.trainable = False

  def call(self, images, training=False):
    bgr = tf.cast(images, tf.float32)[..., ::-1] - tf.constant(_CAFFE_MEAN_BGR, tf.float32)
    return self.resnet(bgr, training=training)

  def get_config(self):
    config = super().get_config()
    config.update(image_size=list(self.image_size), weights=self.weights_name)
    return config


def build_backbone(name, *, image_size, weights=None, width=32, num_stages=4):
  """`SmallBackbone` ("small_cnn") or `ResNet50Backbone` ("resnet50"), named "backbone"."""
  if name == "small_cnn":
    return SmallBackbone(width, num_stages, name="backbone")
  if name == "resnet50":
    return ResNet50Backbone(image_size, weights=weights, name="backbone")
  raise ValueError(f"backbone must be one of {BACKBONES}, got {name!r}.")
