"""Pix2Seq's image encoders: images [B, H, W, 3] (0..255) -> a memory of feature tokens [B, S, D].

  `ConvEncoder`    the shared `backbones.SmallCNN` (GELU, GroupNorm, so replicas never share batch statistics) on
                   centred images, for the synthetic dataset;
  `ResNetEncoder`  `backbones.ResNet(50)` at stride 32 (caffe-normalised input, synchronized BN), for COCO;
both projected to D with a fixed 2-D `sincos` plus a learned position embedding, then Transformer encoder layers.
"""

import keras
import tensorflow as tf

from tfreward.models import backbones
from tfreward.models.pix2seq.layers import EncoderBlock, sincos


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


class ConvEncoder(_TokenEncoder):
  """`backbones.SmallCNN` at stride 2**num_stages on centred images ((x - 127.5) / 64), then encoder layers.

  Args:
    dim: int. Memory width D.
    width: int. Channels of the first stage, doubled per stage up to 8 * width. Defaults to 32.
    num_stages: int. Stride-2 stages; the memory has (H / 2**num_stages) * (W / 2**num_stages) tokens. Defaults to 3.
    num_layers, num_heads, mlp_ratio: int. Transformer encoder layers on the tokens. Defaults to 1, 4, 4.

  Call: images [B, H, W, 3] uint8/float 0..255 -> memory [B, S, D] in the compute dtype.
  """

  def __init__(self, *, dim, width=32, num_stages=3, num_layers=1, num_heads=4, mlp_ratio=4, **kwargs):
    super().__init__(dim=dim, num_layers=num_layers, num_heads=num_heads, mlp_ratio=mlp_ratio, **kwargs)
    self.cnn = backbones.SmallCNN(width, num_stages, max_doublings=3, activation="gelu", activate_sum=False,
                                  norm_epsilon=1e-3, name="cnn")

  def feature_hw(self, image_hw):
    return self.cnn.feature_hw(image_hw)

  def call(self, images):
    return self._tokens(self.cnn(backbones.normalize_images(images, "centered", self.compute_dtype)))


class ResNetEncoder(_TokenEncoder):
  """`backbones.ResNet(50)` C5 features (stride 32; caffe input normalisation, synchronized batch norm, random
  initialisation), projected to D, then encoder layers.

  Args:
    dim: int. Memory width D.
    image_size: (int, int). Input height and width.
    num_layers, num_heads, mlp_ratio: int. Transformer encoder layers on the tokens. Defaults to 2, 8, 4.

  Call: images [B, H, W, 3] uint8/float 0..255 -> memory [B, ceil(H / 32) * ceil(W / 32), D].
  """

  def __init__(self, *, dim, image_size, num_layers=2, num_heads=8, mlp_ratio=4, **kwargs):
    super().__init__(dim=dim, num_layers=num_layers, num_heads=num_heads, mlp_ratio=mlp_ratio, **kwargs)
    self.backbone = backbones.ResNet(50, image_size=image_size, name="backbone")

  def feature_hw(self, image_hw):
    return tuple(-(-int(s) // 32) for s in image_hw)

  def call(self, images, training=False):
    return self._tokens(self.backbone(images, training=training)["C5"])
