"""RetinaNet anchors: bit-identical to mmdetection's generator (golden), sizes, order, XLA, argument checks."""

import math
import os

import numpy as np
import pytest
import tensorflow as tf

from tfreward.ops import anchors as anchor_ops

GOLDEN = os.path.join(os.path.dirname(__file__), os.pardir, "data", "freeanchor", "cases.npz")


def _reference_anchors(image_hw, strides=(8, 16, 32, 64, 128), base_scale=4, per_octave=3, ratios=(0.5, 1.0, 2.0)):
  """Plain loops over levels, rows, columns, ratios and scales, written from the golden README."""
  out = []
  fh, fw = math.ceil(image_hw[0] / strides[0]), math.ceil(image_hw[1] / strides[0])
  for level, s in enumerate(strides):
    if level:
      fh, fw = math.ceil(fh / 2), math.ceil(fw / 2)
    for y in range(fh):
      for x in range(fw):
        for r in ratios:
          for m in range(per_octave):
            scale = np.float32(base_scale * 2.0**(m / per_octave))
            hr = np.sqrt(np.float32(r))
            wr = np.float32(1.0) / hr
            w, h = np.float32(s) * wr * scale, np.float32(s) * hr * scale
            out.append([x * s - 0.5 * w, y * s - 0.5 * h, x * s + 0.5 * w, y * s + 0.5 * h])
  return np.array(out, np.float32)


def test_feature_map_sizes():
  assert anchor_ops.feature_map_sizes((128, 128)) == [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]
  assert anchor_ops.feature_map_sizes((96, 160)) == [(12, 20), (6, 10), (3, 5), (2, 3), (1, 2)]
  assert anchor_ops.feature_map_sizes((800, 1333)) == [(100, 167), (50, 84), (25, 42), (13, 21), (7, 11)]
  assert anchor_ops.feature_map_sizes((100, 60), strides=(4, 8)) == [(25, 15), (13, 8)]


def test_counts():
  assert anchor_ops.num_anchors_per_location() == 9
  assert anchor_ops.num_anchors_per_location(scales_per_octave=2, aspect_ratios=(1.0,)) == 2
  assert anchor_ops.retinanet_anchors((128, 128)).shape == (9 * 341, 4)
  assert anchor_ops.retinanet_anchors((96, 160)).shape == (9 * 323, 4)


@pytest.mark.parametrize("i", [1, 2, 3, 4])
def test_golden_grid_anchors_are_bit_identical(i):
  data = np.load(GOLDEN)
  hw = tuple(int(v) for v in data[f"case{i}_image_hw"])
  got = anchor_ops.retinanet_anchors(hw)
  assert got.dtype == tf.float32
  np.testing.assert_array_equal(got.numpy(), data[f"case{i}_anchors"])


@pytest.mark.parametrize("hw", [(128, 128), (96, 160), (33, 70)])
def test_matches_loop_reference_eager_and_xla(hw):
  want = _reference_anchors(hw)
  np.testing.assert_array_equal(anchor_ops.retinanet_anchors(hw).numpy(), want)
  xla = tf.function(lambda: anchor_ops.retinanet_anchors(hw), jit_compile=True)()
  np.testing.assert_array_equal(xla.numpy(), want)


def test_base_anchors_shape_order_and_geometry():
  base = anchor_ops.base_anchors(8).numpy()
  assert base.shape == (9, 4)
  w, h = base[:, 2] - base[:, 0], base[:, 3] - base[:, 1]
  np.testing.assert_allclose(base[:, 0] + base[:, 2], 0.0, atol=1e-6)  # centred on (0, 0)
  np.testing.assert_allclose(base[:, 1] + base[:, 3], 0.0, atol=1e-6)
  # Ratio-major: index = ratio_index * 3 + scale_index; ratio is h / w.
  np.testing.assert_allclose((h / w).reshape(3, 3), [[0.5] * 3, [1.0] * 3, [2.0] * 3], rtol=1e-6)
  sides = 8 * 4 * 2.0**(np.arange(3) / 3)
  np.testing.assert_allclose(np.sqrt(w * h).reshape(3, 3), np.tile(sides, (3, 1)), rtol=1e-6)
  assert w[0] > h[0]  # the first anchor is the wide one


def test_order_is_level_row_column_base():
  hw = (96, 160)
  anchors = anchor_ops.retinanet_anchors(hw).numpy()
  centres = 0.5 * (anchors[:, :2] + anchors[:, 2:])
  offset = 0
  for (fh, fw), s in zip(anchor_ops.feature_map_sizes(hw), (8, 16, 32, 64, 128)):
    level = centres[offset:offset + fh * fw * 9].reshape(fh, fw, 9, 2)
    ys, xs = np.meshgrid(np.arange(fh), np.arange(fw), indexing="ij")
    np.testing.assert_allclose(level[..., 0], np.repeat((xs * s)[..., None], 9, -1), atol=1e-4)
    np.testing.assert_allclose(level[..., 1], np.repeat((ys * s)[..., None], 9, -1), atol=1e-4)
    offset += fh * fw * 9
  assert offset == anchors.shape[0]


def test_custom_configuration():
  anchors = anchor_ops.retinanet_anchors((32, 32), strides=(16, 32), octave_base_scale=2, scales_per_octave=1,
                                         aspect_ratios=(1.0,))
  np.testing.assert_allclose(anchors.numpy(), [[-16, -16, 16, 16], [0, -16, 32, 16], [-16, 0, 16, 32],
                                               [0, 0, 32, 32], [-32, -32, 32, 32]])


@pytest.mark.parametrize("kwargs, match", [
    (dict(image_hw=(0, 64)), "image_hw"),
    (dict(image_hw=(64,)), "image_hw"),
    (dict(image_hw=(64, 64), strides=()), "strides"),
    (dict(image_hw=(64, 64), strides=(8, 12)), "strides"),
    (dict(image_hw=(64, 64), strides=(16, 8)), "strides"),
    (dict(image_hw=(64, 64), octave_base_scale=0), "octave_base_scale"),
    (dict(image_hw=(64, 64), scales_per_octave=0), "scales_per_octave"),
    (dict(image_hw=(64, 64), aspect_ratios=()), "aspect_ratios"),
    (dict(image_hw=(64, 64), aspect_ratios=(1.0, -2.0)), "aspect_ratios"),
])
def test_bad_arguments_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    anchor_ops.retinanet_anchors(**kwargs)
