"""Tests for tfreward.models.deeplab.reward and the reward mode of the deeplab model: sampling, both estimators
against numpy, XLA, replicas, edge cases (all ignored, one image), class weights, statistics, mixed precision."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfreward import registry, testing
from tfreward.errors import ConfigError
from tfreward.models.deeplab import DeepLab, DeepLabOptions
from tfreward.models.deeplab import model as deeplab_model
from tfreward.models.deeplab import reward
from tfreward.ops import sampling

from tests.models.deeplab.test_model import IMAGE_SIZE, NUM_CLASSES, TINY, _batch

SEEDS = [sampling.fold_in(tf.constant([3, 0], tf.int64), b) for b in range(4)]


def _model(**options):
  keras.utils.set_random_seed(0)
  model = DeepLab({**TINY, "dropout": 0.0, **options}, num_classes=NUM_CLASSES, image_size=IMAGE_SIZE)
  model.build_for_training()
  return model


def _log_softmax(logits):
  shifted = logits - logits.max(-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def _miou(pred, gt, num_classes):
  keep = gt < num_classes
  ious = []
  for c in range(num_classes):
    p, g = (pred == c) & keep, (gt == c) & keep
    union = (p | g).sum()
    if union:
      ious.append((p & g).sum() / union)
  return np.mean(ious) if ious else np.nan


def test_samples_follow_the_tempered_softmax_and_are_identical_under_xla():
  probs = np.array([0.1, 0.6, 0.3], np.float32)
  logits = tf.constant(np.broadcast_to(np.log(probs), (2, 8, 8, 3)))
  for temperature in (1.0, 0.5):
    samples = reward.sample_label_maps(logits, SEEDS[:2], num_samples=200, temperature=temperature)
    assert samples.shape == (2, 200, 8, 8) and samples.dtype == tf.int32
    tempered = probs ** (1 / temperature) / (probs ** (1 / temperature)).sum()
    freq = np.bincount(samples.numpy().ravel(), minlength=3) / samples.numpy().size
    np.testing.assert_allclose(freq, tempered, atol=0.01)
    compiled = tf.function(lambda x: reward.sample_label_maps(x, SEEDS[:2], num_samples=200,
                                                              temperature=temperature), jit_compile=True)(logits)
    np.testing.assert_array_equal(compiled, samples)
  other = reward.sample_label_maps(logits, SEEDS[2:], num_samples=4)
  assert not np.array_equal(other, reward.sample_label_maps(logits, SEEDS[:2], num_samples=4))


def test_reinforce_terms_match_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 8, 8, 3)).astype(np.float32)
  mask = rng.integers(0, 3, (3, 8, 8)).astype(np.int32)
  mask[0, :3] = 255
  mask[2] = 255  # every pixel ignored: undefined mIoU, zero advantage
  terms = reward.reinforce_terms(tf.constant(logits), mask, num_classes=3, seeds=SEEDS[:3], num_samples=4,
                                 temperature=1.0)
  samples = reward.sample_label_maps(tf.constant(logits), SEEDS[:3], num_samples=4).numpy()
  miou = np.array([[_miou(samples[b, n], mask[b], 3) for n in range(4)] for b in range(3)])
  assert np.isnan(miou[2]).all() and not np.isnan(miou[:2]).any()
  rewards = np.nan_to_num(miou)
  advantage = rewards - (rewards.sum(1, keepdims=True) - rewards) / 3
  advantage[2] = 0
  np.testing.assert_allclose(advantage.sum(1), 0, atol=1e-6)
  keep = (mask < 3)[:, None]
  log_probs = np.take_along_axis(_log_softmax(logits)[:, None], samples[..., None], -1)[..., 0]
  mean_log_prob = (log_probs * keep).sum((2, 3)) / np.maximum(keep.sum((2, 3)), 1)
  np.testing.assert_allclose(terms["loss_reward"], -(advantage * mean_log_prob).sum() / 12, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(terms["miou_samples"], miou[:2].mean(), rtol=1e-5)
  np.testing.assert_allclose(terms["reward"], miou[:2].mean(), rtol=1e-5)
  np.testing.assert_allclose(terms["advantage_std"], np.sqrt((advantage[:2] ** 2).mean()), rtol=1e-5)
  greedy = [_miou(logits[b].argmax(-1), mask[b], 3) for b in range(2)]
  np.testing.assert_allclose(terms["miou_greedy"], np.mean(greedy), rtol=1e-5)
  compiled = tf.function(lambda x: reward.reinforce_terms(x, mask, num_classes=3, seeds=SEEDS[:3], num_samples=4,
                                                          temperature=1.0), jit_compile=True)(tf.constant(logits))
  for k in terms:
    np.testing.assert_allclose(compiled[k], terms[k], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("batch", [3, 1])
def test_weighted_ce_terms_match_numpy(batch):
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(batch, 8, 8, 3)).astype(np.float32)
  mask = rng.integers(0, 3, (batch, 8, 8)).astype(np.int32)
  mask[0, :2] = 255
  weights = np.array([0.5, 1.0, 1.5], np.float32)
  pixel_ce, keep_pixels = reward.pixel_cross_entropy(tf.constant(logits), mask, 3, weights)
  terms = reward.weighted_ce_terms(tf.constant(logits), mask, pixel_ce, tf.reduce_sum(keep_pixels), num_classes=3,
                                   baseline_weight=0.1)
  miou = np.array([_miou(logits[b].argmax(-1), mask[b], 3) for b in range(batch)])
  big_r = 1 - miou
  # One image: no other images, baseline 0 (the documented fallback), so r = R.
  r = big_r - 0.1 * (big_r.sum() - big_r) / max(batch - 1, 1)
  keep = mask < 3
  target = np.where(keep, mask, 0)
  ce = -np.take_along_axis(_log_softmax(logits), target[..., None], -1)[..., 0] * weights[target] * keep
  expected = (r * ce.sum((1, 2))).sum() / keep.sum()
  np.testing.assert_allclose(terms["loss_reward"], expected, rtol=1e-5)
  np.testing.assert_allclose(terms["reward"], r.mean(), rtol=1e-5)
  np.testing.assert_allclose(terms["miou_greedy"], miou.mean(), rtol=1e-5)
  np.testing.assert_allclose(terms["advantage_std"], r.std(), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("estimator", ["reinforce", "weighted_ce"])
def test_reward_mode_terms_xla_and_all_ignored(estimator):
  model = _model(mode="reward", estimator=estimator, ce_weight=0.5, aux_head=True)
  expected = {"loss_reward": 1.0, **({"loss_ce": 0.5} if estimator == "reinforce" else {}), "loss_aux": 0.4}
  assert model.loss_weights == expected
  assert model.log_names == tuple(expected) + ("reward",)
  assert model.statistic_names == reward.STATISTICS[estimator]
  assert [c.name for c in model.recipe_callbacks()] == ["reward_stats"]
  images, labels = _batch()
  eager = model.compute_losses(tf.constant(images), labels, training=False)
  assert set(eager) == set(model.loss_weights) | set(model.log_names) | set(model.statistic_names)
  compiled = tf.function(lambda x, y: model.compute_losses(x, y, training=False), jit_compile=True)(images, labels)
  for k in eager:
    np.testing.assert_allclose(compiled[k], eager[k], rtol=1e-4, atol=1e-6)
  ignored = {"mask": np.full_like(labels["mask"], 255)}
  grads, total, terms = model.compute_gradients(tf.constant(images), ignored)
  assert all(np.isfinite(float(v)) for v in terms.values()), terms
  assert all(np.isfinite(g.numpy()).all() for g in grads if g is not None)


@pytest.mark.parametrize("estimator", ["reinforce", "weighted_ce"])
def test_two_replicas_equal_one_replica_in_reward_mode(two_replica_strategy, estimator):
  # Seed 1: with seed 2 one BN output of the tiny model lands within 1e-6 of ReLU's kink, and float rounding
  # (summation order over replicas) flips which side, moving a few backbone gradients by 1e-4.
  images, labels = _batch(4, seed=1)
  options = dict(mode="reward", estimator=estimator, ce_weight=0.3, class_weights="frequency")
  single = _model(**options)
  with two_replica_strategy.scope():
    mirrored = _model(**options)
  for m in (single, mirrored):
    m.set_dataset_statistics({"class_pixel_counts": [900, 50, 50]})
  testing.assert_replicas_match_single(single, mirrored, two_replica_strategy, images, labels, rtol=1e-4)


def test_reward_fit_logs_the_statistics():
  images, labels = _batch(4)
  model = _model(mode="reward", estimator="reinforce", num_samples=2, ce_weight=1.0)
  model.compile(optimizer=keras.optimizers.Adam(1e-3), jit_compile=True)
  model.build_for_training()
  data = tf.data.Dataset.from_tensors((images, labels)).repeat()
  history = model.fit(data, epochs=2, steps_per_epoch=2, verbose=0).history
  assert {"loss", "loss_reward", "loss_ce", "reward"} <= set(history)
  stats = model.reward_statistics()
  assert set(stats) == {"reward", "advantage_std", "miou_samples", "miou_greedy"}
  assert all(np.isfinite(v) for v in stats.values()) and 0 <= stats["miou_samples"] <= 1


def test_mixed_bfloat16_trains_in_both_modes():
  images, labels = _batch(2)
  previous = keras.mixed_precision.global_policy()
  keras.mixed_precision.set_global_policy("mixed_bfloat16")
  try:
    for options in ({}, {"mode": "reward", "estimator": "reinforce", "num_samples": 2}):
      model = _model(**options)
      model.compile(optimizer=keras.optimizers.Adam(1e-3), jit_compile=True)
      model.build_for_training()
      data = tf.data.Dataset.from_tensors((images, labels)).repeat()
      history = model.fit(data, epochs=1, steps_per_epoch=2, verbose=0).history
      assert np.isfinite(history["loss"]).all()
  finally:
    keras.mixed_precision.set_global_policy(previous)


def test_frequency_class_weights_and_the_weighted_cross_entropy():
  weights = deeplab_model.frequency_class_weights([600, 300, 100], smooth=0.05)
  raw = 1 / (np.array([0.6, 0.3, 0.1]) + 0.05)
  np.testing.assert_allclose(weights, raw * 3 / raw.sum())
  assert weights.sum() == pytest.approx(3) and weights[2] > weights[1] > weights[0]
  for bad in ([0, 0, 0], [1, -1, 2], []):
    with pytest.raises(ValueError, match="class pixel counts"):
      deeplab_model.frequency_class_weights(bad, 0.05)
  model = _model(class_weights="frequency")
  assert model.required_dataset_statistics() == ("class_pixel_counts",)
  with pytest.raises(ValueError, match="3 classes"):
    model.set_dataset_statistics({"class_pixel_counts": [1, 2]})
  model.set_dataset_statistics({"class_pixel_counts": [600, 300, 100]})
  images, labels = _batch()
  logits = model(images).numpy()
  mask = labels["mask"]
  keep = mask < NUM_CLASSES
  target = np.where(keep, mask, 0)
  ce = -np.take_along_axis(_log_softmax(logits), target[..., None], -1)[..., 0]
  expected = (ce * weights[target] * keep).sum() / keep.sum()
  terms = model.compute_losses(tf.constant(images), labels, training=False)
  np.testing.assert_allclose(terms["loss_ce"], expected, rtol=1e-5)
  assert _model().required_dataset_statistics() == ()


@pytest.mark.parametrize("options, message", [
    ({"mode": "rl"}, "model.mode"),
    ({"estimator": "ppo"}, "model.estimator"),
    ({"mode": "reward", "estimator": "reinforce", "num_samples": 1}, "model.num_samples must be >= 2"),
    ({"num_samples": 0}, "model.num_samples"),
    ({"temperature": 0.0}, "model.temperature"),
    ({"class_weights": "inverse"}, "model.class_weights"),
    ({"class_weight_smooth": 0}, "model.class_weight_smooth"),
    ({"baseline_weight": -0.1}, "model.baseline_weight"),
    ({"ce_weight": float("inf")}, "model.ce_weight"),
])
def test_bad_reward_options_raise_config_error(options, message):
  with pytest.raises(ConfigError, match=message):
    DeepLabOptions(**options)
  with pytest.raises(ConfigError, match=message):
    registry.parse_options("deeplab", options)
  # num_samples = 1 is fine for the seed's estimator, which samples nothing.
  DeepLabOptions(mode="reward", estimator="weighted_ce", num_samples=1)
