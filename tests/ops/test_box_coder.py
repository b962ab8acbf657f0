"""DeltaXYWH box coder: hand-computed values, golden decode clamp, round trip, XLA, dtypes, argument checks."""

import math
import os

import numpy as np
import pytest
import tensorflow as tf

from tfreward.ops import box_coder

GOLDEN = os.path.join(os.path.dirname(__file__), os.pardir, "data", "freeanchor", "cases.npz")
STDS = (0.1, 0.1, 0.2, 0.2)


def _reference_decode(anchors, deltas, stds=STDS, clip=0.016):
  """The golden README's decode, in float64."""
  a = anchors.astype(np.float64)
  d = deltas.astype(np.float64) * np.array(stds)
  acx, acy = (a[..., 0] + a[..., 2]) * 0.5, (a[..., 1] + a[..., 3]) * 0.5
  aw, ah = a[..., 2] - a[..., 0], a[..., 3] - a[..., 1]
  r = abs(math.log(clip))
  dw, dh = np.clip(d[..., 2], -r, r), np.clip(d[..., 3], -r, r)
  cx, cy, w, h = acx + aw * d[..., 0], acy + ah * d[..., 1], aw * np.exp(dw), ah * np.exp(dh)
  return np.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], -1)


def test_encode_hand_computed():
  anchor = tf.constant([[0.0, 0.0, 10.0, 20.0]])
  box = tf.constant([[1.0, 2.0, 21.0, 12.0]])
  got = box_coder.encode_boxes(anchor, box).numpy()
  want = [[(11.0 - 5.0) / 10 / 0.1, (7.0 - 10.0) / 20 / 0.1, math.log(20 / 10) / 0.2, math.log(10 / 20) / 0.2]]
  np.testing.assert_allclose(got, want, rtol=1e-6)
  means = (0.5, -0.5, 0.1, 0.0)
  got = box_coder.encode_boxes(anchor, box, means=means, stds=(1.0, 1.0, 1.0, 1.0)).numpy()
  np.testing.assert_allclose(got, [[0.6 - 0.5, -0.15 + 0.5, math.log(2) - 0.1, math.log(0.5)]], rtol=1e-6)


def test_decode_hand_computed():
  anchor = tf.constant([[0.0, 0.0, 10.0, 20.0]])
  got = box_coder.decode_boxes(anchor, tf.constant([[1.0, -2.0, 0.5, 0.0]])).numpy()
  w = 10 * math.exp(0.1)
  np.testing.assert_allclose(got, [[6.0 - w / 2, -4.0, 6.0 + w / 2, 16.0]], rtol=1e-6)


def test_round_trip():
  rng = np.random.default_rng(0)
  xy = rng.uniform(0, 100, (2, 50, 2))
  wh = rng.uniform(1, 60, (2, 50, 2))
  anchors = np.concatenate([xy, xy + wh], -1).astype(np.float32)
  xy2 = xy + rng.uniform(-10, 10, xy.shape)
  boxes = np.concatenate([xy2, xy2 + wh * rng.uniform(0.3, 3, wh.shape)], -1).astype(np.float32)
  for means, stds in [((0, 0, 0, 0), STDS), ((0.1, -0.2, 0.3, 0.0), (1.0, 0.5, 2.0, 1.0))]:
    deltas = box_coder.encode_boxes(anchors, boxes, means=means, stds=stds)
    back = box_coder.decode_boxes(anchors, deltas, means=means, stds=stds)
    np.testing.assert_allclose(back.numpy(), boxes, rtol=1e-5, atol=1e-4)


def test_decode_clamps_only_width_and_height_after_the_std():
  anchor = tf.constant([[0.0, 0.0, 256.0, 256.0]]) + 64.0 - 128.0  # 256 x 256 centred on (64, 64)
  # Raw d2 = -25 is -5 after the std, clamped to ln(0.016): the box shrinks to 256 * 0.016 = 4.096 px.
  got = box_coder.decode_boxes(anchor, tf.constant([[0.0, 0.0, -25.0, -25.0]])).numpy()[0]
  np.testing.assert_allclose(got[2] - got[0], 4.096, rtol=1e-5)
  np.testing.assert_allclose(got[3] - got[1], 4.096, rtol=1e-5)
  # Just inside the clamp (|d2 * 0.2| < 4.135) nothing is clamped.
  got = box_coder.decode_boxes(anchor, tf.constant([[0.0, 0.0, 20.0, -20.0]])).numpy()[0]
  np.testing.assert_allclose([got[2] - got[0], got[3] - got[1]], [256 * math.exp(4.0), 256 * math.exp(-4.0)],
                             rtol=1e-5)
  # dx, dy are never clamped.
  got = box_coder.decode_boxes(anchor, tf.constant([[1000.0, -1000.0, 0.0, 0.0]])).numpy()[0]
  np.testing.assert_allclose(0.5 * (got[0] + got[2]), 64.0 + 256 * 100.0, rtol=1e-6)
  np.testing.assert_allclose(0.5 * (got[1] + got[3]), 64.0 - 256 * 100.0, rtol=1e-6)
  # Another clip ratio.
  got = box_coder.decode_boxes(anchor, tf.constant([[0.0, 0.0, 100.0, 0.0]]), wh_ratio_clip=0.5).numpy()[0]
  np.testing.assert_allclose(got[2] - got[0], 512.0, rtol=1e-6)


def test_golden_stress_decode():
  data = np.load(GOLDEN)
  anchors, deltas = data["case4_anchors"], data["case4_bbox_preds"]
  got = box_coder.decode_boxes(tf.constant(anchors), tf.constant(deltas), stds=tuple(data["case4_target_stds"]),
                               wh_ratio_clip=float(data["case4_wh_ratio_clip"])).numpy()
  want = _reference_decode(anchors, deltas, stds=tuple(data["case4_target_stds"]))
  assert got.shape == deltas.shape and np.all(np.isfinite(got))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-3)
  # The README's example: anchor 3054 (256 x 256 centred on (64, 64)) with dw = dh = -25 decodes to 4.1 px.
  np.testing.assert_allclose(anchors[3054], [-64.0, -64.0, 192.0, 192.0])
  np.testing.assert_allclose(got[0, 3054, 2:] - got[0, 3054, :2], [4.096, 4.096], rtol=1e-4)


def test_broadcasting_and_xla():
  rng = np.random.default_rng(1)
  anchors = tf.constant(np.sort(rng.uniform(0, 50, (7, 2, 2)), axis=1).transpose(0, 2, 1).reshape(7, 4)
                        .astype(np.float32))
  deltas = tf.constant(rng.normal(0, 3, (3, 7, 4)).astype(np.float32))
  eager = box_coder.decode_boxes(anchors, deltas)
  xla = tf.function(box_coder.decode_boxes, jit_compile=True)(anchors, deltas)
  assert eager.shape == (3, 7, 4)
  np.testing.assert_allclose(xla.numpy(), eager.numpy(), rtol=1e-6, atol=1e-5)
  np.testing.assert_allclose(eager.numpy(), _reference_decode(anchors.numpy()[None], deltas.numpy()), rtol=1e-5,
                             atol=1e-4)
  enc = box_coder.encode_boxes(anchors, eager)
  enc_xla = tf.function(box_coder.encode_boxes, jit_compile=True)(anchors, eager)
  np.testing.assert_allclose(enc_xla.numpy(), enc.numpy(), rtol=1e-5, atol=1e-5)


def test_dtypes():
  anchors = tf.constant([[0.0, 0.0, 10.0, 10.0]])
  deltas = tf.constant([[0.5, 0.5, 0.5, 0.5]], tf.bfloat16)
  assert box_coder.decode_boxes(anchors, deltas).dtype == tf.float32
  assert box_coder.encode_boxes(anchors, tf.constant([[1.0, 1.0, 5.0, 5.0]], tf.bfloat16)).dtype == tf.float32
  assert box_coder.decode_boxes(tf.cast(anchors, tf.float64), deltas).dtype == tf.float64


@pytest.mark.parametrize("kwargs, match", [
    (dict(stds=(0.1, 0.1, 0.2)), "stds"),
    (dict(stds=(0.1, 0.1, 0.2, -0.2)), "stds"),
    (dict(means=(0.0, 0.0)), "means"),
    (dict(wh_ratio_clip=0.0), "wh_ratio_clip"),
    (dict(wh_ratio_clip=1.5), "wh_ratio_clip"),
])
def test_bad_arguments_raise(kwargs, match):
  anchors = tf.constant([[0.0, 0.0, 10.0, 10.0]])
  with pytest.raises(ValueError, match=match):
    box_coder.decode_boxes(anchors, tf.zeros([1, 4]), **kwargs)
  if "wh_ratio_clip" not in kwargs:
    with pytest.raises(ValueError, match=match):
      box_coder.encode_boxes(anchors, anchors, **kwargs)
  with pytest.raises(ValueError, match="last dimension"):
    box_coder.decode_boxes(anchors, tf.zeros([1, 3]))
