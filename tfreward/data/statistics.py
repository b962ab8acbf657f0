"""Statistics of a dataset split.

`degenerate_box_count`: how many object boxes of a split have no positive extent (zero or negative height or width,
or a non-finite coordinate) in the source annotations, among the non-crowd boxes: the boxes the training pipeline
drops for that reason (`tfreward.data.augment`). Counted on every call (it reads the records, decodes no image).

`class_pixel_counts` (counted once and cached beside the prepared data): the number of labelled pixels of each
segmentation class over a split, at the images' original resolution (every example once, no augmentation). The
counts are written to `<the builder's versioned data dir>/tfreward_class_pixel_counts_<split>.json` (local or
`gs://`) and read from there on later calls; a cache that does not match the dataset (another number of classes or
examples) is recounted.
"""

import json
import logging
import os

import keras
import numpy as np
import tensorflow as tf

from tfreward.data import decoders, pipeline
from tfreward.errors import DatasetError
from tfreward.ops import boxes as box_ops

_LOG = logging.getLogger(__name__)


def _cache_path(builder, split):
  return os.path.join(builder.data_dir, f"tfreward_class_pixel_counts_{split}.json")


def _count(builder, spec, split, num_classes, progress):
  examples = pipeline.read_examples(builder, spec, split)
  total = int(builder.info.splits[split].num_examples)

  def bincount(example):
    mask = decoders.decode_example(spec, example, features=builder.info.features)["mask"]
    mask = tf.reshape(tf.cast(mask, tf.int32), [-1])
    kept = (mask >= 0) & (mask < num_classes)
    return tf.math.bincount(tf.where(kept, mask, num_classes), minlength=num_classes + 1,
                            maxlength=num_classes + 1, dtype=tf.int64)[:num_classes]

  counts = np.zeros(num_classes, np.int64)
  batches = examples.map(bincount, num_parallel_calls=tf.data.AUTOTUNE).batch(64)
  bar = keras.utils.Progbar(total, unit_name="image") if progress else None
  seen = 0
  for batch in batches:
    counts += batch.numpy().sum(0)
    seen += int(batch.shape[0])
    if bar is not None:
      bar.update(seen)
  return counts, seen


def _box_counts(example):
  """One TFDS example (`objects` with `bbox` [N, 4] yxyx and optional `is_crowd`) -> int64 [3]: 1 example, its
  non-crowd boxes and the degenerate ones among them."""
  objects = example["objects"]
  boxes = tf.reshape(tf.cast(objects["bbox"], tf.float32), [-1, 4])
  crowd = tf.cast(objects["is_crowd"], tf.bool) if "is_crowd" in objects else tf.zeros(tf.shape(boxes)[:1], tf.bool)
  target = tf.logical_not(crowd)
  degenerate = tf.logical_and(target, tf.logical_not(box_ops.positive_extent(boxes)))
  return tf.stack([tf.constant(1, tf.int64), tf.reduce_sum(tf.cast(target, tf.int64)),
                   tf.reduce_sum(tf.cast(degenerate, tf.int64))])


def count_degenerate_boxes(examples):
  """`degenerate_box_count` of a `tf.data.Dataset` of TFDS detection examples: dict of ints `examples`, `boxes`
  (non-crowd) and `degenerate` (non-crowd boxes without positive finite extent)."""
  totals = examples.map(_box_counts, num_parallel_calls=tf.data.AUTOTUNE).reduce(
      tf.zeros([3], tf.int64), lambda total, counts: total + counts)
  num_examples, boxes, degenerate = (int(v) for v in totals.numpy())
  return {"examples": num_examples, "boxes": boxes, "degenerate": degenerate}


def degenerate_box_count(dataset, *, split="train", data_dir=None, manual_dir=None):
  """The boxes of `split` that the training pipeline drops as degenerate (see the module docstring).

  Args:
    dataset: a detection dataset name the pipeline knows ("tfreward_shapes", "coco/2017", ...).
    split: str. Defaults to "train".
    data_dir, manual_dir: as for `pipeline.build_dataset`.

  Returns:
    dict of ints: `examples`, `boxes` (non-crowd boxes) and `degenerate` (those without positive extent).
  """
  spec = decoders.get_spec(dataset)
  if "detection" not in spec.tasks:
    raise DatasetError(f"{spec.name} has no boxes to count.")
  builder = pipeline.prepare_dataset(dataset, data_dir, manual_dir)
  if split not in builder.info.splits:
    raise DatasetError(f"{spec.name} has no split {split!r}; it has {', '.join(sorted(builder.info.splits))}.")
  return count_degenerate_boxes(pipeline.read_examples(builder, spec, split))


def class_pixel_counts(dataset, *, split="train", data_dir=None, manual_dir=None, progress=True):
  """Labelled pixels per segmentation class of `split`: a list of C ints (C = the dataset's segmentation classes).

  Args:
    dataset: a dataset name the pipeline knows ("tfreward_shapes", "cityscapes", ...) with segmentation masks.
    split: str. Defaults to "train".
    data_dir, manual_dir: as for `pipeline.build_dataset`.
    progress: bool. A progress bar while counting (the first call only). Defaults to True.
  """
  spec = decoders.get_spec(dataset)
  num_classes = spec.num_segmentation_classes
  if not num_classes:
    raise DatasetError(f"{spec.name} has no segmentation masks to count.")
  builder = pipeline.prepare_dataset(dataset, data_dir, manual_dir)
  if split not in builder.info.splits:
    raise DatasetError(f"{spec.name} has no split {split!r}; it has {', '.join(sorted(builder.info.splits))}.")
  path = _cache_path(builder, split)
  num_examples = int(builder.info.splits[split].num_examples)
  if tf.io.gfile.exists(path):
    with tf.io.gfile.GFile(path) as f:
      cached = json.load(f)
    if cached.get("num_classes") == num_classes and cached.get("num_examples") == num_examples:
      return [int(c) for c in cached["counts"]]
    _LOG.warning("Recounting class pixels: %s was written for another version of the data.", path)
  _LOG.info("Counting the labelled pixels of each class over %s/%s (once; cached in %s).", spec.name, split, path)
  counts, seen = _count(builder, spec, split, num_classes, progress)
  # Written aside and renamed: the workers of a multi-worker run count at the same time, and none may read a
  # half-written file.
  partial = f"{path}.{os.getpid()}.partial"
  with tf.io.gfile.GFile(partial, "w") as f:
    json.dump({"dataset": spec.name, "split": split, "num_classes": num_classes, "num_examples": seen,
               "class_names": list(spec.segmentation_class_names), "counts": counts.tolist()}, f, indent=1)
  tf.io.gfile.rename(partial, path, overwrite=True)
  return counts.tolist()
