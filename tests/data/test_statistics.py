"""Tests for tfreward.data.statistics: class pixel counts of tfreward_shapes/test, cached and validated."""

import json
import os

import numpy as np
import pytest

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
