"""Group DETR layers: sine encodings, inverse sigmoid, group-wise self-attention of the conditional decoder."""

import math

import numpy as np
import pytest
import tensorflow as tf

from tfreward.models.group_detr import layers


def test_sine_embeddings():
  dim = 8
  embed = layers.sine_embed_for_position(tf.constant([[0.25, 0.5]]), dim).numpy()[0]  # (x, y)
  freqs = 10000.0 ** (2 * (np.arange(dim // 2) // 2) / (dim // 2))

  def expected(coord):
    angles = coord * 2 * np.pi / freqs
    return np.where(np.arange(dim // 2) % 2 == 0, np.sin(angles), np.cos(angles))

  np.testing.assert_allclose(embed, np.concatenate([expected(0.5), expected(0.25)]), atol=1e-6)
  grid = layers.sine_position_encoding(2, 4, dim).numpy()  # [h * w, D], row-major
  assert grid.shape == (8, dim)
  centre = layers.sine_embed_for_position(tf.constant([[(2 + 0.5) / 4, (1 + 0.5) / 2]]), dim).numpy()[0]
  np.testing.assert_allclose(grid[1 * 4 + 2], centre, atol=1e-6)
  with pytest.raises(ValueError, match="7"):
    layers.sine_embed_for_position(tf.zeros([1, 2]), 7)


def test_inverse_sigmoid_is_finite_at_0_and_1():
  logits = layers.inverse_sigmoid(tf.constant([0.0, 0.5, 1.0, 0.25])).numpy()
  assert np.all(np.isfinite(logits)) and logits[1] == 0.0
  np.testing.assert_allclose(logits[3], math.log(1 / 3), rtol=1e-5)


def test_decoder_groups_never_see_each_other():
  """With G groups, group 0 of the output equals the decoder run on group 0's queries alone; shapes of every layer."""
  dim, queries = 16, 4
  decoder = layers.ConditionalDecoder(dim, 2, 32, num_layers=2, dropout=0.0)
  encoder = layers.TransformerEncoderLayer(dim, 2, 32, dropout=0.0)
  rng = np.random.default_rng(0)
  pos = layers.sine_position_encoding(3, 3, dim)  # [S, D]
  memory = encoder(tf.constant(rng.normal(size=(2, 9, dim)), tf.float32), pos)
  assert memory.shape == (2, 9, dim)
  query_pos = tf.constant(rng.normal(size=(3 * queries, dim)), tf.float32)
  hs, reference = decoder(memory, pos, query_pos, num_groups=3)
  assert hs.shape == (2, 2, 3 * queries, dim) and reference.shape == (3 * queries, 2)
  alone, _ = decoder(memory, pos, query_pos[:queries], num_groups=1)
  np.testing.assert_allclose(hs[:, :, :queries], alone, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="num_groups"):
    decoder(memory, pos, query_pos[:5], num_groups=2)
