"""Tests for tfreward.data.statistics: class pixel counts of tfreward_shapes/test, cached and validated; the count
of degenerate boxes."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from tfreward.data import shapes, statistics
from tfreward.errors import DatasetError

NAME = "tfreward_shapes/test"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tfds"))
  shapes.ensure_built(NAME, path)
  return path


def test_counts_equal_numpy_and_are_cached(data_dir):
  builder = shapes.ensure_built(NAME, data_dir)
  expected = np.zeros(shapes.NUM_CLASSES + 1, np.int64)
  for example in builder.as_dataset(split="train").as_numpy_iterator():
    expected += np.bincount(example["segmentation_mask"].ravel(), minlength=shapes.NUM_CLASSES + 1)
  counts = statistics.class_pixel_counts(NAME, data_dir=data_dir, progress=False)
  assert counts == expected.tolist() and counts[0] > max(counts[1:]) > 0
  path = os.path.join(builder.data_dir, "tfreward_class_pixel_counts_train.json")
  with open(path) as f:
    cached = json.load(f)
  assert cached["num_examples"] == 40 and cached["counts"] == counts and cached["class_names"][1] == "circle"
  cached["counts"] = [1] * len(counts)  # a later call reads the cache, not the data
  with open(path, "w") as f:
    json.dump(cached, f)
  assert statistics.class_pixel_counts(NAME, data_dir=data_dir, progress=False) == [1] * len(counts)
  cached["num_examples"] = 41  # a cache of another version of the data is recounted
  with open(path, "w") as f:
    json.dump(cached, f)
  assert statistics.class_pixel_counts(NAME, data_dir=data_dir, progress=False) == counts


def test_bad_dataset_or_split(data_dir):
  with pytest.raises(DatasetError, match="no segmentation masks"):
    statistics.class_pixel_counts("coco/2017", data_dir=data_dir)
  with pytest.raises(DatasetError, match="no split 'trian'"):
    statistics.class_pixel_counts(NAME, split="trian", data_dir=data_dir, progress=False)


def test_degenerate_box_count_of_shapes_has_none(data_dir):
  builder = shapes.ensure_built(NAME, data_dir)
  for split, size in (("train", 40), ("validation", 10)):
    boxes = sum(len(ex["objects"]["label"]) for ex in builder.as_dataset(split=split).as_numpy_iterator())
    counts = statistics.degenerate_box_count(NAME, split=split, data_dir=data_dir)
    assert counts == {"examples": size, "boxes": boxes, "degenerate": 0} and boxes > size


def test_count_degenerate_boxes_counts_non_crowd_boxes_without_extent():
  bbox = np.array([[0.1, 0.1, 0.5, 0.5],  # fine
                   [0.2, 0.3, 0.2, 0.6],  # zero height
                   [0.2, 0.3, 0.4, 0.3],  # zero width
                   [0.5, 0.3, 0.2, 0.6],  # inverted
                   [np.nan, 0.3, 0.4, 0.6],  # not finite
                   [0.2, 0.3, 0.2, 0.3],  # zero area, but a crowd region: never a training target
                   [0.2, 0.3, 0.2000001, 0.3000001]], np.float32)  # tiny, not degenerate
  crowd = np.array([False, False, False, False, False, True, False])
  empty = {"objects": {"bbox": np.zeros([0, 4], np.float32), "is_crowd": np.zeros([0], bool)}}
  examples = tf.data.Dataset.from_tensors({"objects": {"bbox": bbox, "is_crowd": crowd}}).concatenate(
      tf.data.Dataset.from_tensors(empty))
  assert statistics.count_degenerate_boxes(examples) == {"examples": 2, "boxes": 6, "degenerate": 4}
  no_crowd = tf.data.Dataset.from_tensors({"objects": {"bbox": bbox}})  # tfreward_shapes has no is_crowd
  assert statistics.count_degenerate_boxes(no_crowd) == {"examples": 1, "boxes": 7, "degenerate": 5}


def test_degenerate_box_count_needs_boxes_and_a_split(data_dir):
  with pytest.raises(DatasetError, match="no boxes"):
    statistics.degenerate_box_count("cityscapes", data_dir=data_dir)
  with pytest.raises(DatasetError, match="no split 'trian'"):
    statistics.degenerate_box_count(NAME, split="trian", data_dir=data_dir)
