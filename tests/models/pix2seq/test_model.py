"""Tests for tfreward.models.pix2seq.model: loss terms and weights, mixed precision, detect under XLA, export,
weights shared by both modes, config round trip."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfreward.export.saved_model import export_saved_model
from tfreward.models.pix2seq import Pix2Seq


def test_loss_weights_and_log_names_follow_the_mode(p2s):
  assert p2s.model("mle").loss_weights == {"loss_mle": 1.0} and p2s.model("mle").log_names == ("loss_mle",)
  anchored = p2s.model(conf_weight=0.0, mle_weight=1.0)
  assert anchored.loss_weights == {"loss_reward": 1.0, "loss_conf": 0.0, "loss_mle": 1.0}
  assert anchored.log_names == ("loss_reward", "loss_conf", "reward", "loss_mle")


def test_mixed_bfloat16_runs(p2s):
  images, labels = p2s.batch(2, seed=2)
  previous = keras.mixed_precision.global_policy()
  keras.mixed_precision.set_global_policy("mixed_bfloat16")
  try:
    model = p2s.model()
    step = tf.function(lambda x, y: model.compute_gradients(x, y))
    grads, total, terms = step(tf.constant(images), labels)
    detections = model.detect(tf.constant(images))
  finally:
    keras.mixed_precision.set_global_policy(previous)
  assert model.decoder.compute_dtype == "bfloat16" and total.dtype == tf.float32
  assert p2s.finite(terms.values()) and p2s.finite([g for g in grads if g is not None])
  assert detections["scores"].dtype == tf.float32 and p2s.finite(detections.values())


def test_samples_are_only_for_reward_mode(p2s):
  images, labels = p2s.batch(2)
  with pytest.raises(ValueError, match="reward mode"):
    p2s.model("mle").compute_losses(tf.constant(images), labels, training=True, samples=tf.zeros([2, 3, 18], tf.int32))


@pytest.mark.parametrize("greedy", [True, False])
def test_detect_compiles_with_xla(p2s, greedy):
  model = p2s.model("mle", detect={"greedy": greedy, "temperature": 0.8, "top_k": 5})
  images = tf.constant(p2s.batch(3)[0])
  eager = model.detect(images)
  compiled = tf.function(model.detect, jit_compile=True)(images)
  for k in eager:
    np.testing.assert_allclose(compiled[k], eager[k], rtol=1e-5, atol=1e-6)
  assert eager["boxes"].shape == (3, 3, 4) and eager["num_detections"].numpy().tolist() == [3, 3, 3]
  scores = eager["scores"].numpy()
  assert (np.diff(scores, axis=1) <= 0).all() and scores.min() >= 0 and scores.max() <= 1
  boxes = eager["boxes"].numpy()
  assert (boxes[..., 2:] >= boxes[..., :2]).all() and ((0 <= boxes) & (boxes <= 1)).all()


def test_exported_saved_model_runs_greedy_and_sampled_decoding(p2s, tmp_path):
  images = np.random.default_rng(0).integers(0, 255, (2, 48, 40, 3)).astype(np.uint8)
  for greedy in (True, False):
    model = p2s.model("mle", detect={"greedy": greedy})
    export_saved_model(model, tmp_path / str(greedy))
    out = tf.saved_model.load(str(tmp_path / str(greedy))).signatures["serve_images"](images=tf.constant(images))
    assert out["boxes"].shape == (2, 3, 4) and out["num_detections"].numpy().tolist() == [3, 3]
    boxes = out["boxes"].numpy()  # pixels of the 48 x 40 originals
    assert p2s.finite(out.values()) and boxes.min() >= 0 and (boxes[..., 2] <= 48).all()
    assert (boxes[..., 3] <= 40).all() and out["scores"].shape == (2, 3) and out["classes"].dtype == tf.int32


def test_mle_weights_load_into_reward_model_and_config_round_trips(p2s, tmp_path):
  mle = p2s.model("mle")
  path = str(tmp_path / "mle.weights.h5")
  mle.save_weights(path)
  reward = p2s.model("reward", samples={"temperature": 0.6})
  reward.load_weights(path)
  for a, b in zip(mle.get_weights(), reward.get_weights()):
    np.testing.assert_array_equal(a, b)
  clone = Pix2Seq.from_config(reward.get_config())
  assert clone.options == reward.options and clone.options.samples.temperature == 0.6
  assert clone.loss_weights == {"loss_reward": 1.0, "loss_conf": 0.3}
  assert clone.log_names == ("loss_reward", "loss_conf", "reward")
