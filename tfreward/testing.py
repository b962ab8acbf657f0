"""Test helpers: the N-replicas-equal-one-replica check every model family must pass, and two tiny models of the
detection and segmentation contracts (`detect` / `segment`) for testing evaluation, callbacks and export.

Usage in a test (with the `two_replica_strategy` fixture of tests/conftest.py):

  single = make_model()
  with strategy.scope():
    mirrored = make_model()
  assert_replicas_match_single(single, mirrored, strategy, images, labels)
"""

import keras
import numpy as np
import tensorflow as tf


def split_batch(strategy, images, labels):
  """Splits a global batch evenly along axis 0 into per-replica values of `strategy`."""
  replicas = strategy.num_replicas_in_sync
  batch = int(images.shape[0])
  if batch % replicas:
    raise ValueError(f"a batch of {batch} does not split evenly over {replicas} replicas.")
  size = batch // replicas
  parts = [(images[i * size:(i + 1) * size], tf.nest.map_structure(lambda v: v[i * size:(i + 1) * size], labels))
           for i in range(replicas)]
  return strategy.experimental_distribute_values_from_function(lambda ctx: parts[ctx.replica_id_in_sync_group])


def single_replica_gradients(model, images, labels):
  """(clipped gradients, total loss, terms) of `model` on the whole batch, outside any strategy."""
  grads, total, terms = model.compute_gradients(tf.convert_to_tensor(images), labels)
  return model.clip_gradients(grads), total, terms


def replica_gradients(model, strategy, images, labels):
  """(gradients, total loss, terms) summed over the replicas of `strategy` (each replica holds its share)."""

  @tf.function
  def replica_step(x, y):
    grads, total, terms = model.compute_gradients(x, y)
    return model.clip_gradients(grads), total, terms

  per_replica = strategy.run(replica_step, args=split_batch(strategy, images, labels))
  return strategy.reduce("SUM", per_replica, axis=None)


def assert_replicas_match_single(single, mirrored, strategy, images, labels, *, rtol=1e-5):
  """Asserts loss terms and gradients on N replicas equal those of one replica on the same global batch.

  `mirrored` (built in `strategy.scope()`) gets `single`'s weights first. Gradients are compared to `rtol` relative
  to the largest gradient entry, so that entries near zero do not demand an impossible relative precision.
  """
  mirrored.set_weights(single.get_weights())
  grads, total, terms = single_replica_gradients(single, images, labels)
  grads2, total2, terms2 = replica_gradients(mirrored, strategy, images, labels)
  np.testing.assert_allclose(total2, total, rtol=rtol, err_msg="total loss")
  for key in terms:
    np.testing.assert_allclose(terms2[key], terms[key], rtol=rtol, atol=1e-7, err_msg=key)
  scale = max([float(tf.reduce_max(tf.abs(g))) for g in grads if g is not None] + [1e-12])
  for variable, a, b in zip(single.trainable_variables, grads, grads2):
    if a is None:
      assert b is None, variable.path
      continue
    np.testing.assert_allclose(b, a, rtol=rtol, atol=rtol * scale, err_msg=variable.path)
  return grads, grads2


class BrightBoxDetector(keras.Model):
  """Detection model of the contract with known outputs, for images [B, H, W, 3] 0..255:
  detection 0 is the bounding box of the bright pixels (mean > 127.5; class 1, score 0.5 + score_offset),
  detection 1 the whole canvas (class 0, 0.25 + score_offset), slot 2 padding (class 3, score 0.7);
  num_detections = 2. Boxes normalised yxyx. `train_step` trains nothing."""

  def __init__(self, image_size=(32, 32), **kwargs):
    super().__init__(**kwargs)
    self.image_size = tuple(image_size)
    self.score_offset = self.add_weight(shape=(), initializer="zeros", name="score_offset")

  def call(self, images):
    return self.detect(images)["scores"]

  def detect(self, images):
    height, width = self.image_size
    bright = tf.reduce_mean(tf.cast(images, tf.float32), axis=-1) > 127.5  # [B, H, W]

    def span(mask, size):  # mask [B, size] -> first and one-past-last True index, normalised
      first = tf.argmax(tf.cast(mask, tf.int32), axis=1, output_type=tf.int32)
      last = size - tf.argmax(tf.cast(mask[:, ::-1], tf.int32), axis=1, output_type=tf.int32)
      return tf.cast(first, tf.float32) / size, tf.cast(last, tf.float32) / size

    y0, y1 = span(tf.reduce_any(bright, axis=2), height)
    x0, x1 = span(tf.reduce_any(bright, axis=1), width)
    batch = tf.shape(images)[0]
    boxes = tf.stack([tf.stack([y0, x0, y1, x1], -1),
                      tf.tile([[0.0, 0.0, 1.0, 1.0]], [batch, 1]),
                      tf.tile([[0.5, 0.5, 1.0, 1.0]], [batch, 1])], axis=1)  # [B, 3, 4]
    scores = tf.tile([[0.5, 0.25, 0.7]], [batch, 1]) + tf.constant([1.0, 1.0, 0.0]) * self.score_offset
    classes = tf.tile(tf.constant([[1, 0, 3]], tf.int32), [batch, 1])
    return {"boxes": boxes, "scores": scores, "classes": classes, "num_detections": tf.fill([batch], 2)}

  def predict_step(self, data):
    return self.detect(data[0] if isinstance(data, tuple) else data)

  def train_step(self, data):
    return {"loss": 0.0 * self.score_offset}


class BrightSegmenter(keras.Model):
  """Segmentation model of the contract: class 1 where the pixel mean exceeds a weight `threshold` (127.5), else 0.
  `segment` returns logits [B, H, W, 2] and labels [B, H, W] int32. `train_step` trains nothing."""

  def __init__(self, image_size=(32, 32), **kwargs):
    super().__init__(**kwargs)
    self.image_size = tuple(image_size)
    self.threshold = self.add_weight(shape=(), initializer=keras.initializers.Constant(127.5), name="threshold")

  def call(self, images):
    return self.segment(images)["logits"]

  def segment(self, images):
    foreground = tf.reduce_mean(tf.cast(images, tf.float32), axis=-1) - self.threshold  # [B, H, W]
    return {"logits": tf.stack([-foreground, foreground], -1), "labels": tf.cast(foreground > 0, tf.int32)}

  def train_step(self, data):
    return {"loss": 0.0 * self.threshold}
