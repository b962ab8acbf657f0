"""Tests for tfreward.models.pix2seq.targets: MLE targets (object order, noise and empty filler), XLA."""

import numpy as np
import pytest
import tensorflow as tf

from tfreward.models.pix2seq import targets
from tfreward.ops import sequence


@pytest.mark.parametrize("order", ["random", "raster", "fixed"])
def test_mle_targets_noise_filler(p2s, order):
  _, labels = p2s.batch()
  tokens, weights = targets.mle_targets(labels["boxes"], labels["classes"], labels["valid"], num_boxes=4,
                                        order=order, seed=tf.constant([1, 2]), **p2s.LAYOUT)
  tokens, weights = tokens.numpy(), weights.numpy()
  allowed = sequence.allowed_tokens(24, **p2s.LAYOUT).numpy()
  assert all(allowed[t][tokens[:, t]].all() for t in range(24))
  boxes, classes, confs = sequence.decode_sequence(tokens, **p2s.LAYOUT)
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


def test_mle_targets_empty_filler_decodes_as_padding(p2s):
  _, labels = p2s.batch()
  tokens, weights = targets.mle_targets(labels["boxes"], labels["classes"], labels["valid"], num_boxes=4,
                                        filler="empty", order="fixed", **p2s.LAYOUT)
  reference = sequence.boxes_to_sequence(labels["boxes"], labels["classes"], labels["valid"], seq_len=24,
                                         order="fixed", **p2s.LAYOUT)
  for got, want in zip(sequence.decode_sequence(tokens, **p2s.LAYOUT),
                       sequence.decode_sequence(reference, **p2s.LAYOUT)):
    np.testing.assert_array_equal(got, want)
  assert (tokens.numpy()[0] == np.tile([3, 3, 3, 3, 20, 0], 4)).all() and (weights.numpy() == 1).all()


def test_mle_targets_same_eagerly_and_under_xla(p2s):
  _, labels = p2s.batch(seed=4)
  fn = lambda seed: targets.mle_targets(labels["boxes"], labels["classes"], labels["valid"], num_boxes=4, seed=seed,
                                        **p2s.LAYOUT)
  seed = tf.constant([5, 6])
  for eager, compiled in zip(fn(seed), tf.function(fn, jit_compile=True)(seed)):
    np.testing.assert_array_equal(compiled, eager)
  assert not np.array_equal(fn(tf.constant([5, 7]))[0], fn(seed)[0])
