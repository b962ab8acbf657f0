import numpy as np
import pytest
import tensorflow as tf

from tfreward.ops import yolox_grid


def _outputs(batch=2, hw=(4, 6), strides=(8, 16), channels=7, seed=0):
  rng = np.random.default_rng(seed)
  return [tf.constant(rng.normal(size=(batch, hw[0] * 8 // s, hw[1] * 8 // s, channels)).astype(np.float32))
          for s in strides]


def test_anchor_order_is_level_then_row_major():
  outputs = _outputs()  # levels 4x6 (stride 8) and 2x3 (stride 16)
  grid, strides = yolox_grid.anchor_grid(outputs, (8, 16))
  assert grid.shape == (24 + 6, 2) and strides.shape == (30,)
  np.testing.assert_array_equal(grid[:7].numpy(), [[0, 0], [1, 0], [2, 0], [3, 0], [4, 0], [5, 0], [0, 1]])
  np.testing.assert_array_equal(grid[24:27].numpy(), [[0, 0], [1, 0], [2, 0]])
  np.testing.assert_array_equal(grid[29].numpy(), [2, 1])
  np.testing.assert_array_equal(strides.numpy(), [8.0] * 24 + [16.0] * 6)
  flat = yolox_grid.flatten_levels(outputs)
  assert flat.shape == (2, 30, 7)
  np.testing.assert_array_equal(flat[:, 24 + 1 * 3 + 2].numpy(), outputs[1][:, 1, 2].numpy())
  np.testing.assert_array_equal(flat[:, 1 * 6 + 5].numpy(), outputs[0][:, 1, 5].numpy())


def test_decode_encode_round_trip_and_centres():
  outputs = _outputs()
  grid, strides = yolox_grid.anchor_grid(outputs, (8, 16))
  raw = yolox_grid.flatten_levels(outputs)[..., :4]
  boxes = yolox_grid.decode_boxes(raw, grid, strides)
  # No +0.5: dx = 0 puts the centre on the cell's top-left corner.
  np.testing.assert_allclose(boxes[..., 0].numpy(), (raw[..., 0].numpy() + grid[:, 0].numpy()) * strides.numpy())
  np.testing.assert_allclose(boxes[..., 3].numpy(), np.exp(raw[..., 3].numpy()) * strides.numpy(), rtol=1e-6)
  np.testing.assert_allclose(yolox_grid.encode_l1_targets(boxes, grid, strides).numpy(), raw.numpy(), atol=1e-5)
  centres = yolox_grid.cell_centers(grid, strides).numpy()
  np.testing.assert_array_equal(centres[[0, 7, 24]], [[4, 4], [12, 12], [8, 8]])


def test_degenerate_sizes_encode_finite():
  grid = tf.zeros([1, 2])
  strides = tf.constant([8.0])
  targets = yolox_grid.encode_l1_targets(tf.constant([[[4.0, 4.0, 0.0, -3.0]]]), grid, strides)
  assert np.all(np.isfinite(targets.numpy()))
  np.testing.assert_allclose(targets[0, 0, 2:].numpy(), [np.log(1e-8)] * 2, rtol=1e-6)


def test_xla_matches_eager():
  outputs = _outputs()

  def fn(*outs):
    grid, strides = yolox_grid.anchor_grid(list(outs), (8, 16))
    return yolox_grid.decode_boxes(yolox_grid.flatten_levels(list(outs))[..., :4], grid, strides)

  np.testing.assert_allclose(tf.function(fn, jit_compile=True)(*outputs).numpy(), fn(*outputs).numpy(), rtol=1e-6)


def test_bad_arguments():
  outputs = _outputs()
  with pytest.raises(ValueError, match=r"\(8,\)"):
    yolox_grid.anchor_grid(outputs, (8,))
  with pytest.raises(ValueError, match="-8"):
    yolox_grid.anchor_grid(outputs, (-8, 16))
  with pytest.raises(ValueError, match=r"\(2, 3\)"):
    yolox_grid.flatten_levels([tf.zeros([2, 3])])
