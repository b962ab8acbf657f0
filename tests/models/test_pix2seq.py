"""Tests for the Pix2Seq family: targets, cached decoding, reward tuning under XLA and replicas, detect, export."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfreward import registry
from tfreward.config import ConfigError
from tfreward.export.saved_model import export_saved_model
from tfreward.models import pix2seq_targets
from tfreward.models.pix2seq import Pix2Seq, Pix2SeqOptions
from tfreward.losses import reinforce
from tfreward.ops import sequence
from tfreward.rewards import detection
from tfreward.training.reward_callback import RewardStatsCallback

IMAGE_SIZE = (32, 32)
TINY = dict(max_level=16, num_boxes=3, encoder_width=8, encoder_stages=2, encoder_layers=1, dim=16, decoder_layers=1,
            num_heads=2, mlp_ratio=2, num_samples=3)
LAYOUT = dict(max_level=16, max_conf=2, num_cls=3)


def _batch(n=4, seed=0, objects=3):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 255, (n, *IMAGE_SIZE, 3)).astype(np.uint8)
  lo = rng.uniform(0, 0.5, (n, objects, 2))
  boxes = np.concatenate([lo, lo + rng.uniform(0.1, 0.5, (n, objects, 2))], -1).astype(np.float32)
  valid = np.arange(objects)[None, :] < rng.integers(1, objects + 1, (n, 1))
  valid[0] = False  # an image without objects
  classes = np.where(valid, rng.integers(0, 3, (n, objects)), -1).astype(np.int32)
  return images, {"boxes": boxes * valid[..., None], "classes": classes, "valid": valid}


def _model(mode="reward", **options):
  model = Pix2Seq(num_classes=3, image_size=IMAGE_SIZE, options=Pix2SeqOptions(mode=mode, **{**TINY, **options}))
  model.build_for_training()
  return model


def _finite(values):
  return all(np.isfinite(np.asarray(tf.convert_to_tensor(v))).all() for v in values)


# === Options and targets ===

def test_options_are_validated_and_registered():
  for bad in (dict(mode="ppo"), dict(num_samples=1), dict(dim=30, num_heads=4), dict(cls_counts="imagenet"),
              dict(order="area"), dict(top_p=0.0), dict(reinforce_samples="worst"), dict(freeze_encoder="yes"),
              dict(conf_detach=1), dict(reinforce_padding="no"), dict(baseline="mean"), dict(advantage_floor="zero"),
              dict(advantage_floor=float("nan")), dict(credit="token"), dict(credit="slot", reinforce_samples="best"),
              dict(credit="box", reinforce_samples="best"), dict(credit="slot", reinforce_samples="deviations"),
              dict(baseline="greedy", reinforce_samples="deviations"),
              dict(advantage_floor=0.0, reinforce_samples="deviations"),
              dict(mle_weight=-1.0), dict(mle_weight=True), dict(mle_weight=float("inf")),
              dict(mle_tokens="boxes")):
    with pytest.raises(ConfigError):
      Pix2SeqOptions(**bad)
  options = registry.parse_options("pix2seq", {"mode": "reward", "num_boxes": 5, "cls_counts": [1, 2, 3]})
  model = registry.get_family("pix2seq").build(options, num_classes=3, image_size=IMAGE_SIZE)
  assert model.seq_len == 30 and model.reward_config["cls_counts"] == (1, 2, 3)
  assert registry.get_family("pix2seq").task == "detection"
  with pytest.raises(ValueError, match="cls_counts"):
    Pix2Seq(num_classes=4, image_size=IMAGE_SIZE, options=options)


@pytest.mark.parametrize("order", ["random", "raster", "fixed"])
def test_mle_targets_noise_filler(order):
  _, labels = _batch()
  tokens, weights = pix2seq_targets.mle_targets(labels["boxes"], labels["classes"], labels["valid"], num_boxes=4,
                                                order=order, seed=tf.constant([1, 2]), **LAYOUT)
  tokens, weights = tokens.numpy(), weights.numpy()
  allowed = sequence.allowed_tokens(24, **LAYOUT).numpy()
  assert all(allowed[t][tokens[:, t]].all() for t in range(24))
  boxes, classes, confs = sequence.decode_sequence(tokens, **LAYOUT)
  counts = labels["valid"].sum(1)
  for b, n in enumerate(counts):
    assert (confs[b, :n].numpy() == 2).all() and (confs[b, n:].numpy() == 0).all()
    gt = sorted(zip(np.round(labels["boxes"][b][labels["valid"][b]] * 16).astype(int).tolist(),
                    labels["classes"][b][labels["valid"][b]].tolist()))
    got = sorted(zip(np.round(boxes[b, :n].numpy() * 16).astype(int).tolist(), classes[b, :n].numpy().tolist()))
    assert got == gt
    expected_weights = np.ones(24)
    expected_weights[6 * n:] = np.tile([0, 0, 0, 0, 0, 1], 4 - n)
    np.testing.assert_array_equal(weights[b], expected_weights)
  if order == "raster":
    corners = np.round(boxes.numpy()[..., :2] * 16)
    for b, n in enumerate(counts):
      keys = corners[b, :n, 0] * 17 + corners[b, :n, 1]
      assert (np.diff(keys) >= 0).all()


def test_mle_targets_empty_filler_decodes_as_padding():
  _, labels = _batch()
  tokens, weights = pix2seq_targets.mle_targets(labels["boxes"], labels["classes"], labels["valid"], num_boxes=4,
                                                filler="empty", order="fixed", **LAYOUT)
  reference = sequence.boxes_to_sequence(labels["boxes"], labels["classes"], labels["valid"], seq_len=24,
                                         order="fixed", **LAYOUT)
  for got, want in zip(sequence.decode_sequence(tokens, **LAYOUT), sequence.decode_sequence(reference, **LAYOUT)):
    np.testing.assert_array_equal(got, want)
  assert (tokens.numpy()[0] == np.tile([3, 3, 3, 3, 20, 0], 4)).all() and (weights.numpy() == 1).all()


def test_mle_targets_same_eagerly_and_under_xla():
  _, labels = _batch(seed=4)
  fn = lambda seed: pix2seq_targets.mle_targets(labels["boxes"], labels["classes"], labels["valid"], num_boxes=4,
                                                seed=seed, **LAYOUT)
  seed = tf.constant([5, 6])
  for eager, compiled in zip(fn(seed), tf.function(fn, jit_compile=True)(seed)):
    np.testing.assert_array_equal(compiled, eager)
  assert not np.array_equal(fn(tf.constant([5, 7]))[0], fn(seed)[0])


# === Decoder ===

def test_cached_decoding_equals_teacher_forcing():
  model = _model("mle")
  memory = model.encoder(tf.constant(_batch()[0]))
  out = model.sample(memory, num_samples=2, seed=tf.constant([0, 1]), return_logits=True)
  tokens = tf.reshape(out["tokens"], [8, model.seq_len])
  forced = model.decoder(model.decoder.shift_right(tokens), tf.repeat(memory, 2, axis=0))
  np.testing.assert_allclose(tf.reshape(out["logits"], forced.shape), forced, rtol=1e-4, atol=1e-5)


def test_box_guided_cross_attention_reads_inside_the_box():
  model = _model("mle")  # one decoder layer: memory reaches a position only through its own cross-attention
  box = sequence.boxes_to_sequence([[[0.0, 0.0, 0.3, 0.3]]], [[1]], [[True]], seq_len=18, order="fixed", **LAYOUT)
  inputs = model.decoder.shift_right(box)
  memory = tf.random.normal([1, 64, 16], seed=0)  # 8 x 8 cells; centres of rows and columns 0..2 are inside
  inside = np.zeros([8, 8], bool)
  inside[:3, :3] = True
  base = model.decoder(inputs, memory).numpy()
  for region, changes in ((~inside, False), (inside, True)):
    bump = tf.constant(np.where(region.reshape(1, 64, 1), 5.0, 0.0), tf.float32)
    moved = model.decoder(inputs, memory + bump).numpy()
    assert np.allclose(moved[0, 4:6], base[0, 4:6], atol=1e-5) != changes  # class and conf of slot 0
    assert not np.allclose(moved[0, :4], base[0, :4], atol=1e-5)  # coordinates see the whole image


# === Reward tuning ===

def test_reward_fit_with_xla_under_default_strategy(tmp_path):
  images, labels = _batch(8)
  model = Pix2Seq(num_classes=3, image_size=IMAGE_SIZE, clip_norm=1.0, options=Pix2SeqOptions(mode="reward", **TINY))
  model.compile(optimizer=keras.optimizers.AdamW(1e-3), jit_compile=True)
  model.build_for_training()
  data = tf.data.Dataset.from_tensor_slices((images, labels)).repeat().batch(4, drop_remainder=True)
  board = keras.callbacks.TensorBoard(str(tmp_path), write_graph=False)
  history = model.fit(data, epochs=1, steps_per_epoch=2, verbose=0, callbacks=[board]).history
  expected = {"loss", "loss_reward", "loss_conf", "reward", "num_matches", "nms_penalty", "reward_50", "reward_95"}
  assert expected <= set(history) and _finite(history.values())
  assert int(model.optimizer.iterations) == 2
  assert os.listdir(tmp_path / "reward")  # batch-level scalars of RewardStatsCallback


# The anchored case: the MLE term's normaliser (supervised tokens) differs between the two halves; raster order and
# empty filler make its targets the same on every replica.
@pytest.mark.parametrize("options", [{}, dict(credit="slot", reinforce_samples="all", mle_weight=1.0,
                                              order="raster", filler="empty"),
                                     dict(reinforce_samples="deviations", reinforce_conf=False)])
def test_two_replicas_equal_one_replica_given_samples(two_replica_strategy, options):
  images, labels = _batch(4, seed=1)
  single = _model(**options)
  with two_replica_strategy.scope():
    mirrored = _model(**options)
  mirrored.set_weights(single.get_weights())
  samples = single.sample(single.encoder(tf.constant(images)), num_samples=3, seed=tf.constant([3, 4]))["tokens"]

  def gradients(model, x, y, s):
    with tf.GradientTape() as tape:
      terms = model.compute_losses(x, y, training=True, samples=s)
      total = model.total_loss(terms)
    grads = tape.gradient(total, model.trainable_variables)
    return [tf.convert_to_tensor(g) for g in grads], total, terms  # embedding gradients are IndexedSlices

  grads, total, terms = gradients(single, tf.constant(images), labels, samples)
  assert float(terms["reward"]) > -1.0 and _finite(terms.values())
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


def test_step_seeds_follow_the_step_and_the_replica(two_replica_strategy):
  with two_replica_strategy.scope():
    model = _model()
  seeds = two_replica_strategy.run(tf.function(lambda: model.step_seed(2)))
  first, second = (s.numpy().tolist() for s in two_replica_strategy.experimental_local_results(seeds))
  assert first != second
  assert model.step_seed(2).numpy().tolist() == first  # outside a strategy: replica 0, step 0


def test_image_without_objects_gives_finite_reward_and_loss():
  images, labels = _batch(2)
  labels["valid"][:] = False
  labels["classes"][:] = -1
  model = _model()
  with tf.GradientTape() as tape:
    terms = model.compute_losses(tf.constant(images), labels, training=True)
    total = model.total_loss(terms)
  grads = tape.gradient(total, model.trainable_variables)
  assert float(terms["reward"]) <= 0.0 and float(terms["num_matches"]) == 0.0
  assert _finite(terms.values()) and _finite([g for g in grads if g is not None])


def test_mixed_bfloat16_runs():
  images, labels = _batch(2, seed=2)
  previous = keras.mixed_precision.global_policy()
  keras.mixed_precision.set_global_policy("mixed_bfloat16")
  try:
    model = _model()
    step = tf.function(lambda x, y: model.compute_gradients(x, y))
    grads, total, terms = step(tf.constant(images), labels)
    detections = model.detect(tf.constant(images))
  finally:
    keras.mixed_precision.set_global_policy(previous)
  assert model.decoder.compute_dtype == "bfloat16" and total.dtype == tf.float32
  assert _finite(terms.values()) and _finite([g for g in grads if g is not None])
  assert detections["scores"].dtype == tf.float32 and _finite(detections.values())


def test_all_samples_average_the_first_sample_losses_over_rotations():
  images, labels = _batch(4, seed=3)
  first, every = _model(), _model(reinforce_samples="all")
  every.set_weights(first.get_weights())
  images = tf.constant(images)
  samples = first.sample(first.encoder(images), num_samples=3, seed=tf.constant([5, 6]))["tokens"]
  terms = every.compute_losses(images, labels, training=True, samples=samples)
  # The leave-one-out baseline is permutation-equivariant: sample n trained alone = the samples rotated to put n first.
  rotated = [first.compute_losses(images, labels, training=True, samples=tf.roll(samples, -n, axis=1))
             for n in range(3)]
  for name in ("loss_reward", "loss_conf", "reward"):
    np.testing.assert_allclose(terms[name], np.mean([r[name] for r in rotated]), rtol=1e-5, atol=1e-6)


def test_greedy_baseline_gives_the_greedy_sequence_no_advantage():
  images, labels = _batch(4, seed=5)
  model = _model(baseline="greedy", reinforce_samples="all")
  images = tf.constant(images)
  greedy = model.sample(model.encoder(images), num_samples=1, greedy=True)["tokens"]
  terms = model.compute_losses(images, labels, training=True, samples=tf.repeat(greedy, 3, axis=1))
  assert float(terms["loss_reward"]) == 0.0 and _finite(terms.values())
  step = tf.function(lambda x, y: model.compute_losses(x, y, training=True), jit_compile=True)
  assert _finite(step(images, labels).values())


def _rewarded_samples(model, images, labels, seed):
  """[B, 3, 18] samples of `model` whose sample 0 holds the ground-truth boxes (rewarded: non-zero advantages); its
  empty slots keep the model's own tokens, so every token is of its position's kind (finite log-probabilities)."""
  samples = model.sample(model.encoder(images), num_samples=3, seed=tf.constant(seed))["tokens"]
  gt = sequence.boxes_to_sequence(labels["boxes"], labels["classes"], labels["valid"], order="fixed", seq_len=18,
                                  **LAYOUT)
  present = tf.repeat(gt[:, 5::6] > 0, 6, axis=1)  # [B, 18] slots holding an object
  first = tf.where(present, gt, samples[:, 0])
  return tf.concat([first[:, None], samples[:, 1:]], axis=1)


def test_advantage_floor_clips_negative_advantages():
  images, labels = _batch(4, seed=6)
  images = tf.constant(images)
  models = [_model(reinforce_samples="all", advantage_floor=floor) for floor in (None, -1e9, 0.0)]
  for m in models[1:]:
    m.set_weights(models[0].get_weights())
  samples = _rewarded_samples(models[0], images, labels, seed=[3, 4])
  plain, very_low, zero = [float(m.compute_losses(images, labels, training=True, samples=samples)["loss_reward"])
                           for m in models]
  assert very_low == plain
  # -advantage * log p >= 0 once advantages are >= 0; the leave-one-out advantages of an image sum to 0, so unless
  # they all vanish some are negative and clipping them changes the loss.
  assert zero >= 0.0 and zero != plain
  compiled = tf.function(lambda x, y, z: models[2].compute_losses(x, y, training=True, samples=z), jit_compile=True)
  np.testing.assert_allclose(compiled(images, labels, samples)["loss_reward"], zero, rtol=1e-5)


def test_best_of_n_imitation_trains_the_reward_best_sequence():
  images, labels = _batch(4, seed=8)
  images = tf.constant(images)
  model = _model(reinforce_samples="best")
  samples = _rewarded_samples(model, images, labels, seed=[1, 2])
  terms = model.compute_losses(images, labels, training=True, samples=samples)
  # The reward-best sequence does not depend on the order of the samples; its loss is a positive NLL.
  rotated = model.compute_losses(images, labels, training=True, samples=tf.roll(samples, 1, axis=1))
  np.testing.assert_allclose(rotated["loss_reward"], terms["loss_reward"], rtol=1e-6)
  assert float(terms["loss_reward"]) > 0.0 and _finite(terms.values())
  # Imitating sample 0 (the ground truth boxes, best wherever an image has objects) differs from imitating greedy.
  greedy = model.sample(model.encoder(images), num_samples=1, greedy=True)["tokens"]
  only_greedy = model.compute_losses(images, labels, training=True, samples=tf.repeat(greedy, 3, axis=1))
  assert float(only_greedy["loss_reward"]) != float(terms["loss_reward"])
  step = tf.function(lambda x, y: model.compute_losses(x, y, training=True), jit_compile=True)
  assert _finite(step(images, labels).values())


@pytest.mark.parametrize("credit, reinforce_samples", [("slot", "first"), ("slot", "all"), ("box", "all")])
def test_per_slot_credit_by_hand(credit, reinforce_samples):
  images, labels = _batch(4, seed=9)
  images = tf.constant(images)
  model = _model(credit=credit, reinforce_samples=reinforce_samples)
  samples = _rewarded_samples(model, images, labels, seed=[7, 8])
  terms = model.compute_losses(images, labels, training=True, samples=samples)
  # By hand: the reward of each sample cut before slot k (slots k.. made padding), returns, leave-one-out baselines.
  gt = sequence.boxes_to_sequence(labels["boxes"], labels["classes"], labels["valid"], order="fixed", seq_len=18,
                                  **LAYOUT)
  reward = lambda seqs: detection.detection_reward(seqs, gt, **model.reward_config)[0].numpy()  # [B, N]
  full = reward(samples)
  kinds = sequence.token_kinds(18).numpy()
  returns = np.stack([full - reward(tf.where((np.arange(18) // 6 < k) | (kinds != sequence.CONF), samples, 0))
                      for k in range(3)], axis=-1)  # [B, N, S]
  np.testing.assert_allclose(returns[..., 0], full, atol=1e-6)  # slot 0 earns the whole reward
  if credit == "box":  # what slot k adds to slots 0..k-1: the returns' differences; they sum to the reward
    returns = returns - np.concatenate([returns[..., 1:], np.zeros_like(returns[..., :1])], axis=-1)
    np.testing.assert_allclose(returns.sum(-1), full, atol=1e-5)
  advantages = returns - (returns.sum(1, keepdims=True) - returns) / 2.0
  chosen, memory = samples[:, 0], model.encoder(images)
  if reinforce_samples == "all":
    chosen, memory, advantages = tf.reshape(samples, [-1, 18]), tf.repeat(memory, 3, axis=0), advantages.reshape(-1, 3)
  else:
    advantages = advantages[:, 0]
  logits = model.decoder(model.decoder.shift_right(chosen), memory)
  expected = reinforce.reinforce_losses(logits=logits, tokens=chosen, advantages=advantages,
                                        match_iou=tf.zeros([chosen.shape[0], 3]), **LAYOUT)["loss_reward"]
  np.testing.assert_allclose(terms["loss_reward"], expected, rtol=1e-5, atol=1e-7)
  # Differs from sequence-level credit, and compiles.
  plain = _model(reinforce_samples=reinforce_samples)
  plain.set_weights(model.get_weights())
  assert float(plain.compute_losses(images, labels, training=True, samples=samples)["loss_reward"]) != float(
      terms["loss_reward"])
  step = tf.function(lambda x, y, z: model.compute_losses(x, y, training=True, samples=z), jit_compile=True)
  np.testing.assert_allclose(step(images, labels, samples)["loss_reward"], terms["loss_reward"], rtol=1e-5,
                             atol=1e-7)


def test_greedy_deviations_by_hand():
  images, labels = _batch(4, seed=11)
  images = tf.constant(images)
  model = _model(reinforce_samples="deviations", reinforce_conf=False, sample_temperature=2.0)
  # Sample 0 as the "greedy" sequence, holding the ground truth (non-zero rewards); samples 1, 2 as the drawn tokens.
  given = _rewarded_samples(model, images, labels, seed=[5, 6])
  terms = model.compute_losses(images, labels, training=True, samples=given)
  gt = sequence.boxes_to_sequence(labels["boxes"], labels["classes"], labels["valid"], order="fixed", seq_len=18,
                                  **LAYOUT)
  reward = lambda seqs: detection.detection_reward(seqs, gt, **model.reward_config)[0].numpy()
  base, draws = given[:, 0].numpy(), given[:, 1:].numpy()
  advantages = np.zeros(draws.shape, np.float32)  # [B, K, L]
  for k in range(2):
    for t in range(18):
      changed = base.copy()
      changed[:, t] = draws[:, k, t]
      advantages[:, k, t] = reward(changed[:, None])[:, 0] - reward(base[:, None])[:, 0]
  assert (advantages != 0).any() and (advantages[draws == base[:, None]] == 0).all()
  logits = model.decoder(model.decoder.shift_right(base), model.encoder(images))
  log_probs = tf.nn.log_softmax(sequence.constrain_logits(logits, **LAYOUT)).numpy()
  drawn_log_prob = np.take_along_axis(log_probs[:, None], draws[..., None], axis=-1)[..., 0]  # [B, K, L]
  not_conf = np.arange(18) % 6 != 5
  expected = -(advantages * drawn_log_prob)[..., not_conf].sum() / (4 * 2 * not_conf.sum())
  np.testing.assert_allclose(terms["loss_reward"], expected, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(terms["reward"], reward(base[:, None]).mean(), rtol=1e-6)  # the base sequence's reward
  step = tf.function(lambda x, y, z: model.compute_losses(x, y, training=True, samples=z), jit_compile=True)
  np.testing.assert_allclose(step(images, labels, given)["loss_reward"], expected, rtol=1e-5, atol=1e-7)
  # Decoding greedily and drawing inside the step compiles too.
  drawn = tf.function(lambda x, y: model.compute_losses(x, y, training=True), jit_compile=True)(images, labels)
  assert _finite(drawn.values())


def test_slot_credit_with_greedy_baseline_compiles():
  images, labels = _batch(4, seed=10)
  model = _model(credit="slot", baseline="greedy", reinforce_samples="all")
  step = tf.function(lambda x, y: model.compute_losses(x, y, training=True), jit_compile=True)
  assert _finite(step(tf.constant(images), labels).values())


def test_mle_weight_adds_the_ground_truth_nll():
  images, labels = _batch(4, seed=11)
  images = tf.constant(images)
  anchored = _model(mle_weight=0.5, order="raster")
  mle = _model(mode="mle", order="raster")
  mle.set_weights(anchored.get_weights())
  terms = anchored.compute_losses(images, labels, training=True)
  np.testing.assert_allclose(terms["loss_mle"], mle.compute_losses(images, labels, training=True)["loss_mle"],
                             rtol=1e-6)
  assert anchored.loss_weights["loss_mle"] == 0.5 and "loss_mle" in anchored.log_names
  step = tf.function(lambda x, y: anchored.compute_losses(x, y, training=True), jit_compile=True)
  np.testing.assert_allclose(step(images, labels)["loss_mle"], terms["loss_mle"], rtol=1e-5)
  assert "loss_mle" not in _model().loss_weights
  # mle_tokens: conf anchors the objectness only: the cross-entropy of the conf tokens of the MLE targets.
  conf_only = _model(mle_weight=0.5, order="raster", mle_tokens="conf")
  conf_only.set_weights(anchored.get_weights())
  target, weights = pix2seq_targets.mle_targets(
      labels["boxes"], labels["classes"], labels["valid"], num_boxes=3, filler="noise", order="raster",
      seed=conf_only.step_seed(1), **LAYOUT)
  logits = sequence.constrain_logits(
      conf_only.decoder(conf_only.decoder.shift_right(target), conf_only.encoder(images)), **LAYOUT)
  ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=target, logits=logits).numpy()[:, 5::6]
  expected = np.sum(ce * weights.numpy()[:, 5::6]) / np.sum(weights.numpy()[:, 5::6])
  np.testing.assert_allclose(conf_only.compute_losses(images, labels, training=True)["loss_mle"], expected,
                             rtol=1e-5)


def test_fit_puts_reward_statistics_first_once(monkeypatch, tmp_path):
  monkeypatch.setattr(keras.Model, "fit", lambda self, *args, **kwargs: (args, kwargs))
  model = _model()
  board, history = keras.callbacks.TensorBoard(str(tmp_path)), keras.callbacks.History()
  _, kwargs = model.fit("data", callbacks=[history, board])
  stats = kwargs["callbacks"][0]
  assert isinstance(stats, RewardStatsCallback) and kwargs["callbacks"][1:] == [history, board]
  assert stats.log_dir == f"{tmp_path}/reward"
  mine = RewardStatsCallback()
  args, _ = model.fit("data", None, None, 1, 0, [mine])
  assert args[5] == [mine]
  assert _model(mode="mle").recipe_callbacks([board]) == []


def test_freeze_encoder_and_conf_detach_cut_gradients():
  images, labels = _batch(4, seed=4)
  base = _model()
  frozen = _model(freeze_encoder=True, conf_detach=True)
  frozen.set_weights(base.get_weights())
  images = tf.constant(images)
  samples = _rewarded_samples(base, images, labels, seed=[7, 8])

  def grads(model, term):
    with tf.GradientTape() as tape:
      value = model.compute_losses(images, labels, training=True, samples=samples)[term]
    return {v.path: g for v, g in zip(model.trainable_variables, tape.gradient(value, model.trainable_variables))}

  base_terms = base.compute_losses(images, labels, training=True, samples=samples)
  frozen_terms = frozen.compute_losses(images, labels, training=True, samples=samples)
  for name in base_terms:  # same values, other gradients
    np.testing.assert_allclose(frozen_terms[name], base_terms[name], rtol=1e-6)
  norm = lambda g: 0.0 if g is None else float(tf.norm(tf.convert_to_tensor(g)))
  conf, reward, base_conf = grads(frozen, "loss_conf"), grads(frozen, "loss_reward"), grads(base, "loss_conf")
  for path in conf:
    if "encoder" in path:
      assert norm(conf[path]) == 0 and norm(reward[path]) == 0
    elif "block" in path:  # decoder states: the confidence loss no longer reaches them, the REINFORCE term does
      assert norm(conf[path]) == 0
  assert sum(norm(g) for p, g in reward.items() if "block" in p) > 0
  assert sum(norm(g) for p, g in base_conf.items() if "block" in p) > 0
  assert norm(conf[frozen.decoder.head.kernel.path]) > 0


def test_samples_are_only_for_reward_mode():
  images, labels = _batch(2)
  with pytest.raises(ValueError, match="reward mode"):
    _model("mle").compute_losses(tf.constant(images), labels, training=True, samples=tf.zeros([2, 3, 18], tf.int32))


# === Inference, export, weights ===

@pytest.mark.parametrize("decode", ["greedy", "sample"])
def test_detect_compiles_with_xla(decode):
  model = _model("mle", decode=decode, temperature=0.8, top_k=5)
  images = tf.constant(_batch(3)[0])
  eager = model.detect(images)
  compiled = tf.function(model.detect, jit_compile=True)(images)
  for k in eager:
    np.testing.assert_allclose(compiled[k], eager[k], rtol=1e-5, atol=1e-6)
  assert eager["boxes"].shape == (3, 3, 4) and eager["num_detections"].numpy().tolist() == [3, 3, 3]
  scores = eager["scores"].numpy()
  assert (np.diff(scores, axis=1) <= 0).all() and scores.min() >= 0 and scores.max() <= 1
  boxes = eager["boxes"].numpy()
  assert (boxes[..., 2:] >= boxes[..., :2]).all() and ((0 <= boxes) & (boxes <= 1)).all()


def test_exported_saved_model_runs_greedy_and_sampled_decoding(tmp_path):
  images = np.random.default_rng(0).integers(0, 255, (2, 48, 40, 3)).astype(np.uint8)
  for decode in ("greedy", "sample"):
    model = _model("mle", decode=decode)
    export_saved_model(model, tmp_path / decode)
    out = tf.saved_model.load(str(tmp_path / decode)).signatures["serve_images"](images=tf.constant(images))
    assert out["boxes"].shape == (2, 3, 4) and out["num_detections"].numpy().tolist() == [3, 3]
    boxes = out["boxes"].numpy()  # pixels of the 48 x 40 originals
    assert _finite(out.values()) and boxes.min() >= 0 and (boxes[..., 2] <= 48).all() and (boxes[..., 3] <= 40).all()
    assert out["scores"].shape == (2, 3) and out["classes"].dtype == tf.int32


def test_mle_weights_load_into_reward_model_and_config_round_trips(tmp_path):
  mle = _model("mle")
  path = str(tmp_path / "mle.weights.h5")
  mle.save_weights(path)
  reward = _model("reward")
  reward.load_weights(path)
  for a, b in zip(mle.get_weights(), reward.get_weights()):
    np.testing.assert_array_equal(a, b)
  clone = Pix2Seq.from_config(reward.get_config())
  assert clone.options == reward.options and clone.loss_weights == {"loss_reward": 1.0, "loss_conf": 0.3}
  assert clone.log_names == ("loss_reward", "loss_conf", "reward")
