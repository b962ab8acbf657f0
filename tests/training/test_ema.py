"""ModelEMA: YOLOX decay ramp, exact per-step averages, swap for evaluation, EMA kept at the end, replicas."""

import math

import keras
import numpy as np
import pytest

from tfreward.training.ema import ModelEMA, ramp_decay


def _model():
  model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4), keras.layers.BatchNormalization(),
                            keras.layers.Dense(1)])
  model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
  return model


def _data(n=16, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, 3)).astype(np.float32)
  return x, (x @ np.array([[1.0], [-2.0], [0.5]], np.float32)).astype(np.float32)


class _Recorder(keras.callbacks.Callback):
  """Records the model's weights after every train batch and at every epoch end (listed BEFORE the EMA)."""

  def __init__(self):
    super().__init__()
    self.after_batch, self.at_epoch_end, self.at_batch_begin = [], [], []

  def on_train_batch_begin(self, batch, logs=None):
    self.at_batch_begin.append([w.numpy() for w in self.model.weights])

  def on_train_batch_end(self, batch, logs=None):
    self.after_batch.append([w.numpy() for w in self.model.weights])

  def on_epoch_end(self, epoch, logs=None):
    self.at_epoch_end.append([w.numpy() for w in self.model.weights])


def _expected_ema(initial, snapshots, updates, decay=0.9998, ramp=2000.0):
  """EMA after each snapshot; snapshots[i] taken after update number updates[i]."""
  ema, last, history = [w.astype(np.float64) for w in initial], 0, []
  for weights, u in zip(snapshots, updates):
    factor = np.prod([ramp_decay(v, decay=decay, ramp_updates=ramp) for v in range(last + 1, u + 1)])
    ema = [factor * e + (1 - factor) * w for e, w in zip(ema, weights)]
    last = u
    history.append(ema)
  return history


def test_ramp_decay_matches_yolox():
  assert ramp_decay(0) == 0.0
  assert ramp_decay(1) == pytest.approx(0.9998 * (1 - math.exp(-1 / 2000)))
  assert ramp_decay(2000) == pytest.approx(0.9998 * (1 - math.exp(-1)))
  assert ramp_decay(10 ** 6) == pytest.approx(0.9998)
  assert ramp_decay(10, decay=0.5, ramp_updates=10) == pytest.approx(0.5 * (1 - math.exp(-1)))


@pytest.mark.parametrize("steps_per_execution", [1, 2])
def test_fit_averages_swaps_and_keeps_ema(steps_per_execution):
  x, y = _data()
  model = _model()
  model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse", steps_per_execution=steps_per_execution)
  initial = [w.numpy() for w in model.weights]
  recorder = _Recorder()
  ema = ModelEMA(decay=0.9, ramp_updates=2.0)  # a fast ramp, so the average differs clearly from the weights
  model.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0, callbacks=[recorder, ema])

  steps_per_epoch = 4
  updates = list(range(steps_per_execution, 2 * steps_per_epoch + 1, steps_per_execution))
  expected = _expected_ema(initial, recorder.after_batch, updates, decay=0.9, ramp=2.0)
  assert len(expected) == len(updates)
  # At the end of each epoch every callback (even one listed before the EMA) sees the EMA weights ...
  per_epoch = steps_per_epoch // steps_per_execution
  for epoch in range(2):
    for seen, want in zip(recorder.at_epoch_end[epoch], expected[(epoch + 1) * per_epoch - 1]):
      np.testing.assert_allclose(seen, want, rtol=1e-5, atol=1e-6)
  # ... training resumes from the training weights ...
  first_of_epoch_2 = recorder.at_batch_begin[per_epoch]
  for seen, want in zip(first_of_epoch_2, recorder.after_batch[per_epoch - 1]):
    np.testing.assert_array_equal(seen, want)
  # ... and the model ends with the EMA weights, BatchNormalization moving statistics included.
  for w, want in zip(model.weights, expected[-1]):
    np.testing.assert_allclose(w.numpy(), want, rtol=1e-5, atol=1e-6)
  moving_mean = [i for i, w in enumerate(model.weights) if "moving_mean" in w.path][0]
  assert not np.allclose(expected[-1][moving_mean], recorder.after_batch[-1][moving_mean])
  assert not ema.swapped


def test_restore_training_weights_at_end_and_integer_weights_untouched():
  x, y = _data()
  model = _model()
  counter = model.add_weight(shape=(), dtype="int32", initializer="zeros", trainable=False, name="counter")
  counter.assign(7)
  recorder = _Recorder()
  ema = ModelEMA(decay=0.5, keep_ema_at_end=False)
  model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[recorder, ema])
  for w, last in zip(model.weights, recorder.after_batch[-1]):
    np.testing.assert_array_equal(w.numpy(), last)
  assert int(counter.numpy()) == 7
  assert len(ema.ema_weights) == len(model.weights) - 1


def test_without_swap_for_evaluation_epoch_end_sees_training_weights():
  x, y = _data()
  model = _model()
  recorder = _Recorder()
  model.fit(x, y, batch_size=8, epochs=1, verbose=0,
            callbacks=[recorder, ModelEMA(decay=0.5, swap_for_evaluation=False)])
  for seen, last in zip(recorder.at_epoch_end[0], recorder.after_batch[-1]):
    np.testing.assert_array_equal(seen, last)


def test_two_replicas(two_replica_strategy):
  x, y = _data()
  with two_replica_strategy.scope():
    model = _model()
  recorder = _Recorder()
  model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0,
            callbacks=[recorder, ModelEMA(decay=0.9, ramp_updates=2.0)])
  initial = recorder.at_batch_begin[0]
  expected = _expected_ema(initial, recorder.after_batch, [1, 2], decay=0.9, ramp=2.0)[-1]
  for w, want in zip(model.weights, expected):
    for value in w.value.values:  # every replica holds the EMA
      np.testing.assert_allclose(value.numpy(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kwargs", [{"decay": 1.0}, {"decay": -0.1}, {"ramp_updates": 0}, {"decay": True}])
def test_bad_arguments(kwargs):
  with pytest.raises(ValueError, match=str(list(kwargs.values())[0])):
    ModelEMA(**kwargs)
