"""Tests for tfreward.models.retinanet.layers: FPN level sizes, RetinaHead flat order, prior bias, GroupNorm."""

import keras
import numpy as np
import tensorflow as tf

from tfreward.models.retinanet.layers import FPN, RetinaHead
from tfreward.ops.anchors import feature_map_sizes


def _levels(hw=(96, 160), channels=(8, 16, 32, 64)):
  """A ResNet-like dict C2..C5 of random features for an image of size `hw`."""
  rng = np.random.default_rng(0)
  return {f"C{l}": tf.constant(rng.normal(size=(1, -(-hw[0] // 2**l), -(-hw[1] // 2**l), c)), tf.float32)
          for l, c in zip((2, 3, 4, 5), channels)}


def test_fpn_levels_match_the_anchor_generator():
  fpn = FPN(16)
  features = fpn(_levels())
  assert [tuple(f.shape[1:3]) for f in features] == feature_map_sizes((96, 160))
  assert all(f.shape[-1] == 16 for f in features)
  assert [w.path.split("/")[-2] for w in fpn.weights[::2]] == ["lateral3", "lateral4", "lateral5", "output3",
                                                              "output4", "output5", "p6", "p7"]
  assert FPN.from_config(fpn.get_config()).channels == 16


def test_head_flat_order_prior_bias_and_group_norm():
  features = FPN(16)(_levels((64, 64)))
  head = RetinaHead(3, num_anchors=9, num_convs=2, channels=16, group_norm=True)
  cls_logits, box_deltas = head(features)
  num_anchors = 9 * sum(h * w for h, w in feature_map_sizes((64, 64)))
  assert cls_logits.shape == (1, num_anchors, 3) and box_deltas.shape == (1, num_anchors, 4)
  np.testing.assert_allclose(head.cls_out.bias, -np.log(99.0), rtol=1e-6)
  norms = [l for l in head.cls_convs if isinstance(l, keras.layers.GroupNormalization)]
  assert len(norms) == 2 and norms[0].groups == 16  # gcd(32, 16 channels)
  assert not any(l.use_bias for l in head.cls_convs if isinstance(l, keras.layers.Conv2D))
  # Level 1 (P4, 4 x 4), cell (row 2, col 3), anchor 5 of the box subnet sits after all 8 x 8 x 9 of level 0.
  raw = features[1]
  for layer in head.box_convs:
    raw = layer(raw)
  raw = head.box_out(raw)
  np.testing.assert_allclose(box_deltas[0, 8 * 8 * 9 + (2 * 4 + 3) * 9 + 5], raw[0, 2, 3, 20:24], rtol=1e-6)
  config = RetinaHead.from_config(head.get_config()).get_config()
  assert config == head.get_config()
