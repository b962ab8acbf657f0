"""Tests for tfreward.models.pix2seq.reward: REINFORCE with the leave-one-out baseline and per-slot credit, under
XLA and replicas; reward statistics and their recipe callback."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfreward.losses import reinforce
from tfreward.models.base import RecipeCallback
from tfreward.models.pix2seq import Pix2Seq
from tfreward.ops import sequence
from tfreward.rewards import detection
from tfreward.training import recipes
from tfreward.training.reward_callback import RewardStatsCallback


def test_reward_fit_with_xla_under_default_strategy(p2s, tmp_path):
  images, labels = p2s.batch(8)
  model = Pix2Seq({"mode": "reward", **p2s.TINY}, num_classes=3, image_size=p2s.IMAGE_SIZE, clip_norm=1.0)
  model.compile(optimizer=keras.optimizers.AdamW(1e-3), jit_compile=True)
  model.build_for_training()
  data = tf.data.Dataset.from_tensor_slices((images, labels)).repeat().batch(4, drop_remainder=True)
  callbacks = recipes.recipe_callbacks(model, log_dir=str(tmp_path))
  history = model.fit(data, epochs=1, steps_per_epoch=2, verbose=0, callbacks=callbacks).history
  expected = {"loss", "loss_reward", "loss_conf", "reward", "num_matches", "nms_penalty", "reward_50", "reward_95"}
  assert expected <= set(history) and p2s.finite(history.values())
  assert int(model.optimizer.iterations) == 2
  assert os.listdir(tmp_path / "reward")  # batch-level scalars of RewardStatsCallback
  thresholds = {f"reward_{t}" for t in range(50, 100, 5)}
  assert set(model.reward_statistics()) == {"reward", "num_matches", "nms_penalty"} | thresholds


def test_recipe_callbacks_name_the_reward_statistics(p2s, tmp_path):
  model = p2s.model()
  assert model.recipe_callbacks() == [RecipeCallback("reward_stats", {})]
  stats, = recipes.recipe_callbacks(model, [keras.callbacks.History()], log_dir=str(tmp_path))
  assert isinstance(stats, RewardStatsCallback) and stats.log_dir == f"{tmp_path}/reward"
  assert recipes.recipe_callbacks(model, [RewardStatsCallback()]) == []
  mle = p2s.model("mle")
  assert mle.recipe_callbacks() == [] and mle.reward_statistics() == {}


# The anchored case: the MLE term's normaliser (supervised tokens) differs between the two halves; raster order and
# empty filler make its targets the same on every replica.
# The third case is configs/shapes/pix2seq_crowded_a_reward.yaml's recipe (conf tokens in the REINFORCE term).
@pytest.mark.parametrize("options", [{}, dict(credit="slot", reinforce_samples="all", mle_weight=1.0,
                                              order="raster", filler="empty", reinforce_conf=False),
                                     dict(credit="slot", reinforce_samples="all", mle_weight=1.0,
                                          order="raster", filler="empty", reinforce_conf=True)])
def test_two_replicas_equal_one_replica_given_samples(p2s, two_replica_strategy, options):
  images, labels = p2s.batch(4, seed=1)
  single = p2s.model(**options)
  with two_replica_strategy.scope():
    mirrored = p2s.model(**options)
  mirrored.set_weights(single.get_weights())
  samples = p2s.rewarded_samples(single, tf.constant(images), labels, seed=[3, 4])

  def gradients(model, x, y, s):
    with tf.GradientTape() as tape:
      terms = model.compute_losses(x, y, training=True, samples=s)
      total = model.total_loss(terms)
    grads = tape.gradient(total, model.trainable_variables)
    return [tf.convert_to_tensor(g) for g in grads], total, terms  # embedding gradients are IndexedSlices

  grads, total, terms = gradients(single, tf.constant(images), labels, samples)
  assert float(terms["reward"]) > 0.0 and float(terms["loss_reward"]) != 0.0 and p2s.finite(terms.values())
  parts = [(images[:2], {k: v[:2] for k, v in labels.items()}, samples[:2]),
           (images[2:], {k: v[2:] for k, v in labels.items()}, samples[2:])]
  values = two_replica_strategy.experimental_distribute_values_from_function(
      lambda ctx: parts[ctx.replica_id_in_sync_group])
  per_replica = two_replica_strategy.run(tf.function(lambda x, y, s: gradients(mirrored, x, y, s)), args=values)
  grads2, total2, terms2 = two_replica_strategy.reduce("SUM", per_replica, axis=None)
  np.testing.assert_allclose(total2, total, rtol=1e-5)
  for k in terms:
    np.testing.assert_allclose(terms2[k], terms[k], rtol=1e-5, atol=1e-7)
  # float32 sums over the halves in another order differ by ulps of the largest gradient entries (tensors that are
  # zero in exact arithmetic, e.g. biases before a normalisation, hold only such rounding).
  scale = max(float(np.abs(a).max()) for a in grads)
  for a, b in zip(grads, grads2):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6 * scale)


def test_step_seeds_follow_the_step_and_the_replica(p2s, two_replica_strategy):
  with two_replica_strategy.scope():
    model = p2s.model()
  seeds = two_replica_strategy.run(tf.function(lambda: model.step_seed(2)))
  first, second = (s.numpy().tolist() for s in two_replica_strategy.experimental_local_results(seeds))
  assert first != second
  assert model.step_seed(2).numpy().tolist() == first  # outside a strategy: replica 0, step 0


def test_image_without_objects_gives_finite_reward_and_loss(p2s):
  images, labels = p2s.batch(2)
  labels["valid"][:] = False
  labels["classes"][:] = -1
  model = p2s.model()
  with tf.GradientTape() as tape:
    terms = model.compute_losses(tf.constant(images), labels, training=True)
    total = model.total_loss(terms)
  grads = tape.gradient(total, model.trainable_variables)
  assert float(terms["reward"]) <= 0.0 and float(terms["num_matches"]) == 0.0
  assert p2s.finite(terms.values()) and p2s.finite([g for g in grads if g is not None])


def test_sampling_in_the_step_uses_the_sample_options(p2s):
  images, labels = p2s.batch(4, seed=2)
  images = tf.constant(images)
  models = [p2s.model(samples={"temperature": t}) for t in (1.0, 1.0, 0.2)]
  for m in models[1:]:
    m.set_weights(models[0].get_weights())
  same, again, colder = [m.compute_losses(images, labels, training=True) for m in models]
  np.testing.assert_array_equal(again["loss_conf"], same["loss_conf"])  # stateless: the same samples
  assert float(colder["loss_conf"]) != float(same["loss_conf"])


def test_all_samples_average_the_first_sample_losses_over_rotations(p2s):
  images, labels = p2s.batch(4, seed=3)
  first, every = p2s.model(), p2s.model(reinforce_samples="all")
  every.set_weights(first.get_weights())
  images = tf.constant(images)
  samples = p2s.rewarded_samples(first, images, labels, seed=[5, 6])
  terms = every.compute_losses(images, labels, training=True, samples=samples)
  # The leave-one-out baseline is permutation-equivariant: sample n trained alone = the samples rotated to put n first.
  rotated = [first.compute_losses(images, labels, training=True, samples=tf.roll(samples, -n, axis=1))
             for n in range(3)]
  for name in ("loss_reward", "loss_conf", "reward"):
    np.testing.assert_allclose(terms[name], np.mean([r[name] for r in rotated]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("credit, reinforce_samples", [("sequence", "first"), ("slot", "first"), ("slot", "all")])
def test_credit_by_hand_eagerly_and_under_xla(p2s, credit, reinforce_samples):
  images, labels = p2s.batch(4, seed=9)
  images = tf.constant(images)
  model = p2s.model(credit=credit, reinforce_samples=reinforce_samples)
  samples = p2s.rewarded_samples(model, images, labels, seed=[7, 8])
  terms = model.compute_losses(images, labels, training=True, samples=samples)
  # By hand: the reward of each sample cut before slot k (slots k.. made padding), returns, leave-one-out baselines.
  gt = sequence.boxes_to_sequence(labels["boxes"], labels["classes"], labels["valid"], order="fixed", seq_len=18,
                                  **p2s.LAYOUT)
  reward = lambda seqs: detection.detection_reward(seqs, gt, **model.reward_config)[0].numpy()  # [B, N]
  full = reward(samples)
  kinds = sequence.token_kinds(18).numpy()
  returns = np.stack([full - reward(tf.where((np.arange(18) // 6 < k) | (kinds != sequence.CONF), samples, 0))
                      for k in range(3)], axis=-1)  # [B, N, S]
  np.testing.assert_allclose(returns[..., 0], full, atol=1e-6)  # slot 0 earns the whole reward
  credits = returns if credit == "slot" else full
  advantages = credits - (credits.sum(1, keepdims=True) - credits) / 2.0
  chosen, memory = samples[:, 0], model.encoder(images)
  if reinforce_samples == "all":
    chosen, memory = tf.reshape(samples, [-1, 18]), tf.repeat(memory, 3, axis=0)
    advantages = advantages.reshape([-1, *advantages.shape[2:]])
  else:
    advantages = advantages[:, 0]
  assert np.abs(advantages).max() > 0
  logits = model.decoder(model.decoder.shift_right(chosen), memory)
  expected = reinforce.reinforce_losses(logits=logits, tokens=chosen, advantages=advantages,
                                        match_iou=tf.zeros([chosen.shape[0], 3]), **p2s.LAYOUT)["loss_reward"]
  np.testing.assert_allclose(terms["loss_reward"], expected, rtol=1e-5, atol=1e-7)
  step = tf.function(lambda x, y, z: model.compute_losses(x, y, training=True, samples=z), jit_compile=True)
  compiled = step(images, labels, samples)
  for name in terms:
    np.testing.assert_allclose(compiled[name], terms[name], rtol=1e-5, atol=1e-7)
  if credit == "slot":  # differs from sequence-level credit
    plain = p2s.model(reinforce_samples=reinforce_samples)
    plain.set_weights(model.get_weights())
    assert float(plain.compute_losses(images, labels, training=True, samples=samples)["loss_reward"]) != float(
        terms["loss_reward"])


def test_sampling_reward_step_compiles(p2s):
  images, labels = p2s.batch(4, seed=10)
  model = p2s.model(credit="slot", reinforce_samples="all", mle_weight=1.0)
  step = tf.function(lambda x, y: model.compute_losses(x, y, training=True), jit_compile=True)
  compiled = step(tf.constant(images), labels)
  eager = model.compute_losses(tf.constant(images), labels, training=True)
  for name in eager:
    np.testing.assert_allclose(compiled[name], eager[name], rtol=1e-5, atol=1e-6)
