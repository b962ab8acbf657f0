"""Tests for tfreward.models.pix2seq.mle: the MLE loss by hand, and as the reward mode's anchor (`mle_weight`)."""

import numpy as np
import tensorflow as tf

from tfreward.models.pix2seq import mle, targets
from tfreward.ops import sequence


def test_mle_loss_is_the_weighted_mean_cross_entropy_of_the_targets(p2s):
  images, labels = p2s.batch(4, seed=12)
  images = tf.constant(images)
  model = p2s.model("mle", order="raster")
  seed = model.step_seed(1)
  target, weights = targets.mle_targets(labels["boxes"], labels["classes"], labels["valid"], num_boxes=3,
                                        order="raster", seed=seed, **p2s.LAYOUT)
  memory = model.encoder(images)
  logits = sequence.constrain_logits(model.decoder(model.decoder.shift_right(target), memory), **p2s.LAYOUT)
  log_probs = tf.nn.log_softmax(logits).numpy()
  nll = -np.take_along_axis(log_probs, target.numpy()[..., None], axis=-1)[..., 0]
  expected = np.sum(nll * weights.numpy()) / np.sum(weights.numpy())
  terms = mle.mle_loss(model.decoder, memory, labels, layout=model.layout, num_boxes=3, filler="noise",
                       order="raster", seed=seed)
  np.testing.assert_allclose(terms["loss_mle"], expected, rtol=1e-5)
  np.testing.assert_allclose(model.compute_losses(images, labels, training=True)["loss_mle"], expected, rtol=1e-5)


def test_mle_weight_adds_the_ground_truth_nll(p2s):
  images, labels = p2s.batch(4, seed=11)
  images = tf.constant(images)
  anchored = p2s.model(mle_weight=0.5, order="raster")
  plain = p2s.model(mode="mle", order="raster")
  plain.set_weights(anchored.get_weights())
  terms = anchored.compute_losses(images, labels, training=True)
  np.testing.assert_allclose(terms["loss_mle"], plain.compute_losses(images, labels, training=True)["loss_mle"],
                             rtol=1e-6)
  assert anchored.loss_weights["loss_mle"] == 0.5 and "loss_mle" in anchored.log_names
  step = tf.function(lambda x, y: anchored.compute_losses(x, y, training=True), jit_compile=True)
  np.testing.assert_allclose(step(images, labels)["loss_mle"], terms["loss_mle"], rtol=1e-5)
  assert "loss_mle" not in p2s.model().loss_weights
