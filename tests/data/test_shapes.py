"""Tests for the `tfreward_shapes` TFDS builder and its numpy renderer (host side: no XLA involved)."""

import hashlib
import logging

import numpy as np
import pytest
import tensorflow_datasets as tfds

from tfreward.data import shapes
from tfreward.data import shapes_render

TINY = "tfreward_shapes/test"


def _examples(builder, split):
  return {int(ex["image/id"]): ex for ex in tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False))}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  builder = shapes.ensure_built(TINY, data_dir)
  return builder, {split: _examples(builder, split) for split in ("train", "validation")}, data_dir


# --- Renderer -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("label", range(shapes.NUM_CLASSES))
def test_shape_mask_inside_its_circle(label):
  grid = (np.arange(64)[:, None] + 0.5, np.arange(64)[None, :] + 0.5)
  for angle in (0.0, 0.7, 2.0):
    mask = shapes_render.shape_mask(label, center_yx=(31.3, 30.8), diameter=40.0, angle=angle, hole_ratio=0.5,
                                    grid_yx=grid)
    assert mask.shape == (64, 64) and mask.dtype == bool
    ys, xs = np.nonzero(mask)
    assert len(ys) > 100
    assert np.all(np.hypot(ys + 0.5 - 31.3, xs + 0.5 - 30.8) <= 20.0 + 1e-9)


def test_shape_mask_geometry():
  grid = (np.arange(64)[:, None] + 0.5, np.arange(64)[None, :] + 0.5)
  kwargs = dict(center_yx=(32.0, 32.0), diameter=40.0, angle=0.3, hole_ratio=0.5, grid_yx=grid)
  circle = shapes_render.shape_mask(0, **kwargs)
  assert abs(circle.sum() - np.pi * 20.0**2) < 0.03 * np.pi * 20.0**2
  ring = shapes_render.shape_mask(4, **kwargs)
  assert not ring[32, 32] and ring.sum() < circle.sum()
  square = shapes_render.shape_mask(1, **kwargs)
  assert abs(square.sum() - 2 * 20.0**2) < 0.05 * 2 * 20.0**2  # Inscribed square: side r * sqrt(2).
  with pytest.raises(ValueError, match="7"):
    shapes_render.shape_mask(7, **kwargs)


def test_render_is_deterministic_and_seed_dependent():
  a, b = shapes_render.render_example((1, 0, 5)), shapes_render.render_example((1, 0, 5))
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])
  c = shapes_render.render_example((1, 0, 6))
  assert not np.array_equal(a["image"], c["image"])


@pytest.mark.parametrize("size, scene", [(128, shapes_render.Scene()), (256, shapes_render.Scene()),
                                         (128, shapes.CROWDED)], ids=["128", "256", "crowded"])
def test_render_invariants(size, scene):
  counts = []
  for index in range(40):
    ex = shapes_render.render_example((7, 1, index), size=size, scene=scene)
    n = len(ex["labels"])
    counts.append(n)
    assert ex["image"].shape == (size, size, 3) and ex["image"].dtype == np.uint8
    assert ex["mask"].shape == (size, size) and ex["mask"].dtype == np.uint8
    assert ex["boxes"].shape == (n, 4) and ex["boxes"].dtype == np.float32
    assert ex["labels"].dtype == np.int64 and 1 <= n <= scene.max_objects
    assert np.all(ex["visible_fraction"] >= shapes_render.MIN_VISIBLE_FRACTION)
    np.testing.assert_array_equal(ex["mask"] > 0, ex["instances"] > 0)
    for k in range(n):
      on = ex["instances"] == k + 1
      np.testing.assert_array_equal(np.unique(ex["mask"][on]), [ex["labels"][k] + 1])
      ys, xs = np.nonzero(on)
      expected = np.array([ys.min(), xs.min(), ys.max() + 1, xs.max() + 1], np.float32) / size
      np.testing.assert_array_equal(ex["boxes"][k], expected)
      extent = max(ys.max() + 1 - ys.min(), xs.max() + 1 - xs.min())
      assert extent <= scene.max_size * size / 128 + 2
  assert len(set(counts)) > 3  # Object counts vary.
  if scene == shapes.CROWDED:  # a few placements may fail, but scenes stay crowded
    assert np.mean(counts) > 20 and min(counts) >= 10


def test_default_scenes_are_unchanged():
  # The bytes of the original scenes (1-8 shapes of 8-64 px) did not move when the scene became a parameter.
  digest = hashlib.sha256()
  for index in range(3):
    ex = shapes_render.render_example((7, 1, index))
    for key in sorted(ex):
      digest.update(ex[key].tobytes())
  assert digest.hexdigest() == "1df3daab7680fbe58cef95731d94b0ed42f02316f89a2ef236ea2155652f5536"


def test_bad_scene_raises():
  for bad, match in ((dict(min_objects=0), "min_objects"), (dict(min_objects=9, max_objects=8), "max_objects"),
                     (dict(max_objects=300), "254"), (dict(min_size=2.0), "min_size"),
                     (dict(min_size=30.0, max_size=20.0), "max_size")):
    with pytest.raises(ValueError, match=match):
      shapes_render.Scene(**bad)
  with pytest.raises(ValueError, match="scene"):
    shapes.ShapesConfig(name="bad", scene={"max_objects": 3})


def test_render_rejects_bad_size():
  with pytest.raises(ValueError, match="16"):
    shapes_render.render_example(0, size=16)


# --- Builder ---------------------------------------------------------------------------------------------------------


def test_configs_and_features(tmp_path):
  assert shapes.CLASS_NAMES == ("circle", "square", "triangle", "star", "ring", "cross") and shapes.NUM_CLASSES == 6
  assert set(shapes.TfrewardShapes.builder_configs) == {"128", "256", "test", "crowded"}
  assert shapes.TfrewardShapes.builder_configs["crowded"].scene == shapes.CROWDED
  assert tfds.builder("tfreward_shapes", data_dir=str(tmp_path)).builder_config.name == "128"
  for config, size in (("128", 128), ("256", 256)):
    builder = shapes.TfrewardShapes(config=config, data_dir=str(tmp_path))
    assert builder.builder_config.num_train == 4000 and builder.builder_config.num_validation == 500
    assert str(builder.info.version) == "1.0.0"
    features = builder.info.features
    assert features["image"].shape == (size, size, 3)
    assert features["segmentation_mask"].shape == (size, size, 1)
    assert features["objects"]["label"].names == list(shapes.CLASS_NAMES)


def test_parse_name_and_bad_arguments():
  assert shapes.parse_name("tfreward_shapes") == "128"
  assert shapes.parse_name("tfreward_shapes/256") == "256"
  for bad in ("tfreward_shapes/512", "coco/2017", "tfreward_shapes/", "tfreward_shapes/128/x"):
    with pytest.raises(ValueError, match=bad):
      shapes.ensure_built(bad, None)
  with pytest.raises(ValueError, match="test"):
    shapes.example_seed("test", 0)
  with pytest.raises(ValueError, match="-1"):
    shapes.image_id("train", -1)
  with pytest.raises(ValueError, match="0"):
    shapes.ShapesConfig(name="bad", num_train=0)
  with pytest.raises(ValueError, match="30"):
    shapes.ShapesConfig(name="bad", size=30)


def test_split_sizes_and_ids(built):
  builder, examples, _ = built
  assert builder.info.splits["train"].num_examples == 40
  assert builder.info.splits["validation"].num_examples == 10
  assert sorted(examples["train"]) == list(range(1, 41))
  assert sorted(examples["validation"]) == list(range(1_000_001, 1_000_011))


def test_example_features(built):
  _, examples, _ = built
  for split, by_id in examples.items():
    for image_id, ex in by_id.items():
      assert ex["image"].shape == (128, 128, 3) and ex["image"].dtype == np.uint8
      assert ex["segmentation_mask"].shape == (128, 128, 1) and ex["segmentation_mask"].dtype == np.uint8
      assert ex["image/id"].dtype == np.int64
      boxes, labels = ex["objects"]["bbox"], ex["objects"]["label"]
      assert boxes.dtype == np.float32 and labels.dtype == np.int64
      assert boxes.shape[1:] == (4,) and 1 <= len(boxes) <= 8 and len(labels) == len(boxes)
      assert np.all(np.isfinite(boxes)) and np.all((boxes >= 0.0) & (boxes <= 1.0))
      assert np.all(boxes[:, 0] < boxes[:, 2]) and np.all(boxes[:, 1] < boxes[:, 3])
      assert np.all((labels >= 0) & (labels < shapes.NUM_CLASSES))
      mask = ex["segmentation_mask"][:, :, 0]
      assert mask.max() <= shapes.NUM_CLASSES
      pixels = np.round(boxes * 128).astype(int)
      covered = np.zeros_like(mask, bool)  # Object pixels inside a box of their own class.
      for (y0, x0, y1, x1), label in zip(pixels, labels):
        region = mask[y0:y1, x0:x1]
        assert np.any(region == label + 1), (split, image_id, label)
        covered[y0:y1, x0:x1] |= region == label + 1
      assert np.all(covered[mask > 0]), (split, image_id)


def test_examples_equal_renderer(built):
  _, examples, _ = built
  for split, index in (("train", 0), ("train", 39), ("validation", 3)):
    ex = examples[split][shapes.image_id(split, index)]
    ref = shapes_render.render_example(shapes.example_seed(split, index), size=128)
    np.testing.assert_array_equal(ex["image"], ref["image"])
    np.testing.assert_array_equal(ex["segmentation_mask"][:, :, 0], ref["mask"])
    np.testing.assert_array_equal(ex["objects"]["label"], ref["labels"])
    np.testing.assert_allclose(ex["objects"]["bbox"], ref["boxes"], atol=1e-7)


def test_second_build_is_identical_and_ensure_built_is_idempotent(built, tmp_path, caplog):
  _, first, _ = built
  with caplog.at_level(logging.INFO, logger="tfreward.data.shapes"):
    builder = shapes.ensure_built(TINY, str(tmp_path))
  assert any("generating it now" in r.getMessage() for r in caplog.records)
  second = {split: _examples(builder, split) for split in first}
  for split in first:
    assert first[split].keys() == second[split].keys()
    for image_id, ex in first[split].items():
      other = second[split][image_id]
      assert ex["image"].tobytes() == other["image"].tobytes()
      assert ex["segmentation_mask"].tobytes() == other["segmentation_mask"].tobytes()
      assert ex["objects"]["bbox"].tobytes() == other["objects"]["bbox"].tobytes()
      assert ex["objects"]["label"].tobytes() == other["objects"]["label"].tobytes()
  caplog.clear()
  with caplog.at_level(logging.INFO, logger="tfreward.data.shapes"):
    again = shapes.ensure_built(TINY, str(tmp_path))
  assert again.is_prepared() and not caplog.records


def test_load_shapes(built):
  _, examples, data_dir = built
  dataset = shapes.load_shapes("validation", name=TINY, data_dir=data_dir)
  assert sorted(int(ex["image/id"]) for ex in dataset) == sorted(examples["validation"])
  with pytest.raises(ValueError, match="test"):
    shapes.load_shapes("test", name=TINY, data_dir=data_dir)
