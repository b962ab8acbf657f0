"""`Dropout`: Keras' dropout with the Philox generator named, for fast XLA on every device.

`keras.layers.Dropout` draws its mask with `tf.nn.experimental.stateless_dropout`'s default generator
("auto_select"), whose XLA lowering on CPU is about 30x slower than Philox (a [16, 8, 8, 64] mask: 15.8 ms against
0.5 ms on 2 cores); on TPU both are fast. Same seeding as Keras (a `keras.random.SeedGenerator` per layer), same
scaling (kept values divided by 1 - rate).
"""

import keras
import tensorflow as tf


class Dropout(keras.layers.Layer):
  """Inverted dropout on any tensor shape; identity when not training or `rate` is 0.

  Args:
    rate: float in [0, 1). Fraction of the values set to 0 in training.
    seed: optional int for the layer's `keras.random.SeedGenerator`.
  """

  def __init__(self, rate, seed=None, **kwargs):
    super().__init__(**kwargs)
    self.rate = float(rate)
    if not 0.0 <= self.rate < 1.0:
      raise ValueError(f"rate must be in [0, 1), got {rate!r}.")
    self.seed = seed
    self.seed_generator = keras.random.SeedGenerator(seed)

  def call(self, x, training=False):
    if not training or self.rate == 0.0:
      return x
    seed = tf.cast(self.seed_generator.next(), tf.int32)
    return tf.nn.experimental.stateless_dropout(x, rate=self.rate, seed=seed, rng_alg="philox")

  def get_config(self):
    config = super().get_config()
    config.update(rate=self.rate, seed=self.seed)
    return config
