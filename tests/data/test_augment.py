"""Random flip and scale jitter keep images, boxes and masks consistent."""

import numpy as np
import pytest
import tensorflow as tf

from tfreward.data import augment

# Three rectangles in a 40 x 60 image, in pixels [y0, x0, y1, x1) (end exclusive); the third touches the corner.
RECTS = np.array([[4, 6, 14, 20], [20, 30, 37, 41], [30, 50, 40, 60]])
H, W = 40, 60


def _example():
  """image [H, W, 3] uint8, boxes [3, 4] normalised yxyx, mask [H, W] int32 (k + 1 on rectangle k)."""
  image = np.zeros([H, W, 3], np.uint8)
  mask = np.zeros([H, W], np.int32)
  for k, (y0, x0, y1, x1) in enumerate(RECTS):
    image[y0:y1, x0:x1] = 50 * (k + 1)
    mask[y0:y1, x0:x1] = k + 1
  boxes = (RECTS / np.array([H, W, H, W])).astype(np.float32)
  return tf.constant(image), tf.constant(boxes), tf.constant(mask)


def _assert_mask_inside_boxes(boxes, keep, mask, output_hw, tol=1e-4):
  """Every pixel of object k lies inside its box (pixel centres) and the box is tight to 1 pixel.

  Pixel centres are 1 apart on the canvas whatever the scale, so the nearest-neighbour mask reaches to within one
  pixel of each box edge (`tol` absorbs float ties at the edges).
  """
  out_h, out_w = output_hw
  pixels = boxes * np.array([out_h, out_w, out_h, out_w])
  for k in range(len(boxes)):
    ys, xs = np.nonzero(mask == k + 1)
    if not keep[k]:
      assert ys.size == 0, f"object {k} was dropped but {ys.size} of its pixels are in the canvas"
      continue
    assert ys.size > 0
    cy, cx = ys + 0.5, xs + 0.5
    y0, x0, y1, x1 = pixels[k]
    assert cy.min() >= y0 - tol and cy.max() <= y1 + tol and cx.min() >= x0 - tol and cx.max() <= x1 + tol
    assert max(cy.min() - y0, y1 - cy.max(), cx.min() - x0, x1 - cx.max()) <= 1.0 + tol


def test_flip_left_right_mirrors_boxes_and_mask():
  image, boxes, mask = _example()
  f_image, f_boxes, f_mask = augment.flip_left_right(image, boxes, mask)
  np.testing.assert_array_equal(f_image.numpy(), image.numpy()[:, ::-1])
  np.testing.assert_array_equal(f_mask.numpy(), mask.numpy()[:, ::-1])
  expected = RECTS.copy()
  expected[:, 1], expected[:, 3] = W - RECTS[:, 3], W - RECTS[:, 1]
  np.testing.assert_allclose(f_boxes.numpy(), expected / np.array([H, W, H, W]), atol=1e-6)
  _assert_mask_inside_boxes(f_boxes.numpy(), [True] * 3, f_mask.numpy(), (H, W))
  twice = augment.flip_left_right(*augment.flip_left_right(image, boxes, mask))
  np.testing.assert_allclose(twice[1].numpy(), boxes.numpy(), atol=1e-6)
  np.testing.assert_array_equal(twice[2].numpy(), mask.numpy())


def test_flip_without_mask_and_empty_boxes():
  image, _, _ = _example()
  f_image, f_boxes, f_mask = augment.flip_left_right(image, tf.zeros([0, 4]))
  assert f_mask is None and f_boxes.shape == (0, 4) and f_image.shape == (H, W, 3)


@pytest.mark.parametrize("probability", [0.0, 1.0])
def test_random_horizontal_flip_probability_extremes(probability):
  image, boxes, mask = _example()
  for s in range(3):
    out = augment.random_horizontal_flip(image, boxes, mask, seed=[s, 7], probability=probability)
    expected = augment.flip_left_right(image, boxes, mask) if probability else (image, boxes, mask)
    for got, want in zip(out, expected):
      np.testing.assert_allclose(got.numpy(), want.numpy())


def test_random_horizontal_flip_is_seeded_and_flips_about_half():
  image, boxes, mask = _example()
  flips = []
  for s in range(40):
    a = augment.random_horizontal_flip(image, boxes, mask, seed=[s, 1])
    b = augment.random_horizontal_flip(image, boxes, mask, seed=[s, 1])
    np.testing.assert_array_equal(a[2].numpy(), b[2].numpy())
    _assert_mask_inside_boxes(a[1].numpy(), [True] * 3, a[2].numpy(), (H, W))
    flips.append(not np.array_equal(a[2].numpy(), mask.numpy()))
  assert 8 <= sum(flips) <= 32


def test_random_horizontal_flip_rejects_bad_probability():
  image, boxes, _ = _example()
  with pytest.raises(ValueError, match="1.5"):
    augment.random_horizontal_flip(image, boxes, seed=[0, 0], probability=1.5)


@pytest.mark.parametrize("output_hw", [(40, 60), (32, 64), (48, 40)])
def test_random_scale_crop_keeps_boxes_and_mask_consistent(output_hw):
  image, boxes, mask = _example()
  scales = []
  for s in range(12):
    out_image, out_boxes, keep, out_mask, scale = augment.random_scale_crop(
        image, boxes, mask, output_hw=output_hw, scale_range=(0.6, 1.6), seed=[s, 3])
    assert out_image.shape == (*output_hw, 3) and out_image.dtype == tf.uint8
    assert out_mask.shape == output_hw and out_mask.dtype == tf.int32
    assert out_boxes.shape == (3, 4) and keep.shape == (3,)
    b = out_boxes.numpy()
    assert np.all(np.isfinite(b)) and b.min() >= 0.0 and b.max() <= 1.0
    _assert_mask_inside_boxes(b, keep.numpy(), out_mask.numpy(), output_hw)
    # Image pixels follow the mask: the object's colour where the mask says so (bilinear edges aside).
    img, m = out_image.numpy()[..., 0].astype(int), out_mask.numpy()
    for k in range(3):
      inner = (m == k + 1) & (np.roll(m, 1, 0) == k + 1) & (np.roll(m, -1, 0) == k + 1) & \
              (np.roll(m, 1, 1) == k + 1) & (np.roll(m, -1, 1) == k + 1)
      assert np.all(np.abs(img[inner] - 50 * (k + 1)) <= 1)
    # The area the scaled image does not reach is padding: 255 in the mask and 0 in the image.
    fit = min(output_hw[0] / H, output_hw[1] / W)
    assert fit * 0.6 - 1e-6 <= float(scale) <= fit * 1.6 + 1e-6
    new_h, new_w = round(H * float(scale)), round(W * float(scale))
    if new_h < output_hw[0]:
      assert np.all(m[new_h:] == 255) and np.all(out_image.numpy()[new_h:] == 0)
    if new_w < output_hw[1]:
      assert np.all(m[:, new_w:] == 255) and np.all(out_image.numpy()[:, new_w:] == 0)
    assert np.all(m[:min(new_h, output_hw[0]), :min(new_w, output_hw[1])] != 255)
    scales.append(float(scale))
  assert len(set(scales)) > 1


def test_random_scale_crop_drops_boxes_cut_away():
  image, boxes, mask = _example()
  # A 2x zoom into a 20 x 30 canvas shows only a quarter of the scaled image: some object must leave it.
  dropped = 0
  for s in range(20):
    _, out_boxes, keep, out_mask, _ = augment.random_scale_crop(
        image, boxes, mask, output_hw=(20, 30), scale_range=(4.0, 4.0), seed=[s, 0])
    _assert_mask_inside_boxes(out_boxes.numpy(), keep.numpy(), out_mask.numpy(), (20, 30))
    dropped += int(np.sum(~keep.numpy()))
  assert dropped > 0


def test_random_scale_crop_is_deterministic_per_seed():
  image, boxes, mask = _example()
  a = augment.random_scale_crop(image, boxes, mask, output_hw=(32, 48), scale_range=(0.5, 2.0), seed=[4, 2])
  b = augment.random_scale_crop(image, boxes, mask, output_hw=(32, 48), scale_range=(0.5, 2.0), seed=[4, 2])
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x.numpy(), y.numpy())


def test_random_scale_crop_identity_scale_and_no_mask():
  image, boxes, _ = _example()
  out_image, out_boxes, keep, out_mask, scale = augment.random_scale_crop(
      image, boxes, output_hw=(H, W), scale_range=(1.0, 1.0), seed=[0, 0])
  assert out_mask is None and float(scale) == 1.0 and np.all(keep.numpy())
  np.testing.assert_array_equal(out_image.numpy(), image.numpy())
  np.testing.assert_allclose(out_boxes.numpy(), boxes.numpy(), atol=1e-6)


def test_random_scale_crop_empty_boxes():
  image, _, mask = _example()
  _, out_boxes, keep, out_mask, _ = augment.random_scale_crop(
      image, tf.zeros([0, 4]), mask, output_hw=(24, 24), scale_range=(0.8, 1.25), seed=[1, 1])
  assert out_boxes.shape == (0, 4) and keep.shape == (0,) and out_mask.shape == (24, 24)


def test_random_scale_crop_drops_degenerate_boxes_and_keeps_tiny_ones():
  image, _, _ = _example()
  boxes = np.array([[0.1, 0.1, 0.5, 0.5],  # fine
                    [0.2, 0.3, 0.2, 0.6],  # zero height
                    [0.2, 0.3, 0.2, 0.3],  # zero area
                    [0.5, 0.3, 0.2, 0.6],  # inverted
                    [0.2, 0.6, 0.4, 0.3],  # inverted
                    [np.nan, 0.3, 0.4, 0.6],  # NaN
                    [0.1, 0.3, 0.4, np.inf],  # not finite (clipping would hide it)
                    [0.2, 0.3, 0.2 + 0.05 / H, 0.3 + 0.05 / W]], np.float32)  # 0.05 x 0.05 px: tiny, kept
  for scale_range, hflip in (((1.0, 1.0), False), ((1.0, 1.0), True), ((0.5, 2.0), True)):
    for seed in range(3):
      b = tf.constant(boxes)
      if hflip:
        _, b, _ = augment.flip_left_right(image, b)
      _, out_boxes, keep, _, scale = augment.random_scale_crop(image, b, output_hw=(H, W), scale_range=scale_range,
                                                               seed=[seed, 7])
      keep = keep.numpy()
      assert not keep[1:7].any()
      kept = out_boxes.numpy()[keep]
      assert np.all(kept[:, 2:] > kept[:, :2])  # every kept box has a positive extent
      if scale_range == (1.0, 1.0):
        assert keep[0] and keep[7]


@pytest.mark.parametrize("scale_range", [(0.0, 1.0), (1.2, 0.8), (-1.0, 2.0)])
def test_random_scale_crop_rejects_bad_scale_range(scale_range):
  image, boxes, _ = _example()
  with pytest.raises(ValueError, match="scale_range"):
    augment.random_scale_crop(image, boxes, output_hw=(8, 8), scale_range=scale_range, seed=[0, 0])
