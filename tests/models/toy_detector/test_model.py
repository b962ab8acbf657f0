"""The shared TaskModel steps with the toy detector: 1 replica equals 2, fit runs under both strategies."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfreward import strategy as strategies
from tfreward.models.toy_detector import ToyDetector
from tfreward.testing import assert_replicas_match_single

IMAGE_SIZE = (32, 32)


def _batch(n=8, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 255, (n, *IMAGE_SIZE, 3)).astype(np.uint8)
  lo = rng.uniform(0, 0.5, (n, 4, 2))
  boxes = np.concatenate([lo, lo + rng.uniform(0.1, 0.5, (n, 4, 2))], -1).astype(np.float32)
  valid = np.arange(4)[None, :] < rng.integers(0, 5, (n, 1))  # includes images without objects
  valid[0] = False
  classes = np.where(valid, rng.integers(0, 3, (n, 4)), -1).astype(np.int32)
  return images, {"boxes": boxes * valid[..., None], "classes": classes, "valid": valid}


def _model(clip_norm=None):
  model = ToyDetector({"num_slots": 4, "width": 8}, num_classes=3, image_size=IMAGE_SIZE, clip_norm=clip_norm)
  model.build_for_training()
  return model


@pytest.mark.parametrize("clip_norm", [None, 0.05])
def test_two_replicas_equal_one_replica(two_replica_strategy, clip_norm):
  images, labels = _batch()
  single = _model(clip_norm)
  with two_replica_strategy.scope():
    mirrored = _model(clip_norm)
  _, grads2 = assert_replicas_match_single(single, mirrored, two_replica_strategy, images, labels)
  if clip_norm:
    assert float(tf.linalg.global_norm(grads2)) == pytest.approx(clip_norm, rel=1e-4)


def _fit(strategy, steps=2):
  images, labels = _batch(16)
  with strategy.scope():
    model = ToyDetector({"num_slots": 4, "width": 8}, num_classes=3, image_size=IMAGE_SIZE, clip_norm=1.0)
    xla = strategies.use_xla_in_compile(strategy)
    model.compile(optimizer=keras.optimizers.AdamW(1e-3), jit_compile=xla, steps_per_execution=2 if xla else 1)
    model.build_for_training()

  def dataset_fn(ctx):
    ds = tf.data.Dataset.from_tensor_slices((images, labels)).repeat()
    return ds.batch(ctx.get_per_replica_batch_size(8), drop_remainder=True)

  data = strategy.distribute_datasets_from_function(dataset_fn)
  history = model.fit(data, epochs=2, steps_per_epoch=steps, verbose=0)
  return model, history.history


def test_fit_default_strategy_with_xla():
  model, history = _fit(tf.distribute.get_strategy())
  assert set(history) == {"loss", "loss_l1", "loss_ce"}
  assert all(np.isfinite(v) for vs in history.values() for v in vs)
  outputs = model.predict(_batch(4)[0], verbose=0)
  assert outputs["boxes"].shape == (4, 4, 4) and outputs["num_detections"].tolist() == [4] * 4


def test_fit_two_replicas(two_replica_strategy):
  _, history = _fit(two_replica_strategy)
  assert all(np.isfinite(v) for vs in history.values() for v in vs)


def test_detect_compiles_with_xla():
  model = _model()
  images = tf.constant(_batch(4)[0])
  eager = model.detect(images)
  compiled = tf.function(model.detect, jit_compile=True)(images)
  for k in eager:
    np.testing.assert_allclose(compiled[k], eager[k], rtol=1e-5, atol=1e-6)


def test_mixed_bfloat16_step_runs():
  previous = keras.mixed_precision.global_policy()
  keras.mixed_precision.set_global_policy("mixed_bfloat16")
  try:
    model = ToyDetector({"num_slots": 4, "width": 8}, num_classes=3, image_size=IMAGE_SIZE)
    model.compile(optimizer=keras.optimizers.AdamW(1e-3), jit_compile=True)
    model.build_for_training()
  finally:
    keras.mixed_precision.set_global_policy(previous)
  assert model.convs[0].compute_dtype == "bfloat16" and model.convs[0].kernel.dtype == "float32"
  images, labels = _batch(8)
  logs = model.train_on_batch(images, labels, return_dict=True)
  assert all(np.isfinite(v) for v in logs.values())
  assert model.detect(tf.constant(images))["boxes"].dtype == tf.float32
