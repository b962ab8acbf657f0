"""Tests for the dataset preview grid (host side: PIL drawing, no XLA involved)."""

import numpy as np
import pytest
from PIL import Image

from tfreward.data import preview
from tfreward.data import shapes

TINY = "tfreward_shapes/test"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tfds"))
  shapes.ensure_built(TINY, path)
  return path


def _example(size=128):
  """One synthetic example: a square of label 1 at rows 32..63, columns 48..79, grey background."""
  image = np.full((size, size, 3), 100, np.uint8)
  image[32:64, 48:80] = (10, 200, 30)
  mask = np.zeros((size, size, 1), np.uint8)
  mask[32:64, 48:80] = 2
  box = np.array([[32, 48, 64, 80]], np.float32) / size
  return {"image": image, "image/id": np.int64(7), "segmentation_mask": mask,
          "objects": {"bbox": box, "label": np.array([1], np.int64)}}


@pytest.mark.parametrize("num_images,columns,split,expected_size", [
    (6, 3, "train", (1592, 596)),  # 3 * (2 * 256 + 8) + 4 * 8 wide; 28 + 2 * (16 + 256) + 3 * 8 high.
    (16, 4, "validation", (2120, 876)),  # The split has only 10 examples: 3 rows.
    (1, 4, "train", (2120, 316)),
])
def test_write_preview_png(data_dir, tmp_path, num_images, columns, split, expected_size):
  path = tmp_path / "preview.png"
  out = preview.write_preview(path, name=TINY, split=split, data_dir=data_dir, num_images=num_images,
                              columns=columns)
  assert out == path and path.stat().st_size > 1000
  with Image.open(path) as image:
    assert image.format == "PNG" and image.mode == "RGB" and image.size == expected_size
    pixels = np.asarray(image, np.int64)
  assert len(np.unique(pixels[..., 0] * 65536 + pixels[..., 1] * 256 + pixels[..., 2])) > 100


def test_write_preview_builds_when_missing(tmp_path):
  path = preview.write_preview(str(tmp_path / "p.png"), name=TINY, split="validation", data_dir=str(tmp_path / "d"),
                               num_images=2, columns=2)
  with Image.open(path) as image:
    assert image.size == (2 * (2 * 256 + 8) + 3 * 8, 28 + 272 + 2 * 8)
  assert (tmp_path / "d" / "tfreward_shapes" / "test" / "1.0.0").is_dir()


def test_boxes_hug_objects_and_mask_aligns():
  grid = np.asarray(preview.render_grid([_example()], class_names=shapes.CLASS_NAMES, columns=1))
  top, left = preview.HEADER + preview.PAD + preview.CAPTION, preview.PAD
  panel = grid[top:top + 256, left:left + 256]  # Upscaled x2: the square covers rows 64..127, columns 96..159.
  colour = preview.class_colour(1)
  np.testing.assert_array_equal(panel[64:128, 96:160], np.broadcast_to([10, 200, 30], (64, 64, 3)))
  for row, column in ((62, 120), (63, 120), (128, 120), (129, 120), (100, 94), (100, 95), (100, 160), (100, 161)):
    np.testing.assert_array_equal(panel[row, column], colour, err_msg=str((row, column)))
  np.testing.assert_array_equal(panel[100, 40], [100, 100, 100])  # Far from the box: untouched.
  mask_panel = grid[top:top + 256, left + 256 + preview.PAD:left + 512 + preview.PAD]
  np.testing.assert_array_equal(mask_panel[64:128, 96:160], np.broadcast_to(colour, (64, 64, 3)))
  np.testing.assert_array_equal(mask_panel[63, 120], [255, 255, 255])  # The box frame in white.
  np.testing.assert_array_equal(mask_panel[10, 10], preview.BACKGROUND)


def test_render_grid_object_free_image_and_256():
  empty = _example(256)
  empty["objects"] = {"bbox": np.zeros((0, 4), np.float32), "label": np.zeros((0,), np.int64)}
  empty["segmentation_mask"][:] = 0
  grid = preview.render_grid([empty, _example(256)], class_names=shapes.CLASS_NAMES, columns=2)
  assert grid.size == (2 * (2 * 256 + 8) + 3 * 8, 28 + 272 + 2 * 8)  # 256 images are not upscaled.
  top, left = preview.HEADER + preview.PAD + preview.CAPTION, preview.PAD
  pixels = np.asarray(grid)
  np.testing.assert_array_equal(pixels[top:top + 256, left:left + 256], empty["image"])


def test_bad_arguments(tmp_path):
  path = str(tmp_path / "x.png")
  with pytest.raises(ValueError, match="0"):
    preview.write_preview(path, name=TINY, num_images=0)
  with pytest.raises(ValueError, match="-2"):
    preview.write_preview(path, name=TINY, columns=-2)
  with pytest.raises(ValueError, match="test"):
    preview.write_preview(path, name=TINY, split="test")
  with pytest.raises(ValueError, match="coco"):
    preview.write_preview(path, name="coco/2017", data_dir=str(tmp_path))
  with pytest.raises(ValueError, match=r"\[\]"):
    preview.render_grid([], class_names=shapes.CLASS_NAMES)
