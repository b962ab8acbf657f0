"""Per-dataset decoding of TFDS examples into one common example dict, and each dataset's metadata.

The pipeline reads TFDS examples with their images still encoded (`skip_decoding`), so that sharding, filtering
and shuffling move bytes, not pixels; `decode_example` then decodes what it needs with the builder's own
feature connectors and returns the common dict:

  image:    [H, W, 3] uint8, the original image.
  image_id: [] int64. COCO and tfreward_shapes: the dataset's id. Cityscapes (string ids such as
            "bonn_000001_000019"): a stable 63-bit fingerprint of the string.
  boxes:    [N, 4] float32 yxyx normalised to the original image (N = 0 for Cityscapes).
  classes:  [N] int32, 0-based object classes.
  crowd:    [N] bool, COCO's `is_crowd` (False elsewhere).
  mask:     [H, W] int32 semantic labels, `IGNORE_INDEX` where unlabelled; only for datasets with masks
            (tfreward_shapes: 0 background and class + 1 for objects; Cityscapes: the 19 training ids).
"""

import dataclasses
import difflib
import io
import os
import re
import zipfile

import tensorflow as tf
import tensorflow_datasets as tfds

from tfreward.errors import DatasetError

IGNORE_INDEX = 255

COCO_CLASS_NAMES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush")
# COCO category id of each 0-based TFDS label (TFDS numbers the 80 used categories in id order).
COCO_CATEGORY_IDS = (tuple(range(1, 12)) + tuple(range(13, 26)) + (27, 28) + tuple(range(31, 45)) +
                     tuple(range(46, 66)) + (67, 70) + tuple(range(72, 83)) + tuple(range(84, 91)))

CITYSCAPES_CLASS_NAMES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle")
# Raw Cityscapes label id (0..33) -> training id (0..18); every other id maps to IGNORE_INDEX.
CITYSCAPES_LABEL_TO_TRAIN_ID = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13, 27: 14,
    28: 15, 31: 16, 32: 17, 33: 18}
CITYSCAPES_MANUAL_FILES = ("leftImg8bit_trainvaltest.zip", "gtFine_trainvaltest.zip")


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """What a dataset provides.

  Attributes:
    name: str. The name the pipeline accepts ("coco/2017", "cityscapes", ...).
    tfds_name: str. The TFDS builder, with its config ("cityscapes/semantic_segmentation").
    tasks: tuple of "detection" / "segmentation" the dataset supports.
    class_names: tuple of str. Object classes, 0-based (Cityscapes: its 19 semantic classes).
    segmentation_class_names: tuple of str. Names of the mask values 0..K-1 (empty without masks).
    ignore_index: int. Mask value of unlabelled and padded pixels. Defaults to 255.
    manual_files: tuple of str. Files a manual download must put in `manual_dir` (empty if none).
    splits: tuple of str. The TFDS splits. Defaults to ("train", "validation").
  """
  name: str
  tfds_name: str
  tasks: tuple
  class_names: tuple
  segmentation_class_names: tuple = ()
  ignore_index: int = IGNORE_INDEX
  manual_files: tuple = ()
  splits: tuple = ("train", "validation")

  @property
  def num_classes(self):
    """Number of object classes."""
    return len(self.class_names)

  @property
  def num_segmentation_classes(self):
    """Number of mask classes (0 without masks)."""
    return len(self.segmentation_class_names)

  def num_classes_for(self, task):
    """Classes a model predicts for `task`: object classes, or mask classes for "segmentation"."""
    if task not in self.tasks:
      raise DatasetError(f"dataset {self.name!r} supports tasks {self.tasks}, got task {task!r}.")
    return self.num_segmentation_classes if task == "segmentation" else self.num_classes


def _shapes_spec(name):
  from tfreward.data import shapes  # Imported here: it is the only user of the synthetic builder's module.
  names = tuple(shapes.CLASS_NAMES)
  return DatasetSpec(name=name, tfds_name=name, tasks=("detection", "segmentation"), class_names=names,
                     segmentation_class_names=("background",) + names)


_SPECS = {
    "tfreward_shapes": lambda: _shapes_spec("tfreward_shapes"),  # config "128"
    "tfreward_shapes/128": lambda: _shapes_spec("tfreward_shapes/128"),
    "tfreward_shapes/256": lambda: _shapes_spec("tfreward_shapes/256"),
    "tfreward_shapes/test": lambda: _shapes_spec("tfreward_shapes/test"),  # 40 train / 10 validation, for tests
    "tfreward_shapes/crowded": lambda: _shapes_spec("tfreward_shapes/crowded"),  # 15-40 small shapes per image
    "coco/2017": lambda: DatasetSpec(name="coco/2017", tfds_name="coco/2017", tasks=("detection",),
                                     class_names=COCO_CLASS_NAMES, splits=("train", "validation", "test")),
    "cityscapes": lambda: DatasetSpec(
        name="cityscapes", tfds_name="cityscapes/semantic_segmentation", tasks=("segmentation",),
        class_names=CITYSCAPES_CLASS_NAMES, segmentation_class_names=CITYSCAPES_CLASS_NAMES,
        manual_files=CITYSCAPES_MANUAL_FILES, splits=("train", "validation", "test")),
}
_ALIASES = {"cityscapes/semantic_segmentation": "cityscapes"}
KNOWN_DATASETS = tuple(_SPECS)


def get_spec(dataset):
  """The `DatasetSpec` of `dataset` (a name in `KNOWN_DATASETS`); ValueError listing them otherwise."""
  key = _ALIASES.get(dataset, dataset)
  if key not in _SPECS:
    raise DatasetError(f"unknown dataset {dataset!r}; known datasets: {', '.join(KNOWN_DATASETS)}.")
  return _SPECS[key]()


def check_split(spec, split, key="split"):
  """DatasetError naming `key` unless `split` is a TFDS split expression ("validation", "train[:10%]",
  "train+validation") over `spec.splits` (or "all")."""
  names = [re.match(r"\s*([^\[(\s]*)", part).group(1) for part in split.split("+")] if isinstance(split, str) else []
  unknown = [name for name in names if name not in spec.splits + ("all",)]
  if not names or unknown:
    close = difflib.get_close_matches(unknown[0], spec.splits, n=1) if unknown else []
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise DatasetError(f"{key} {split!r} is not a split of {spec.name}{hint}; its splits are "
                       f"{', '.join(spec.splits)}, and slices of them such as 'train[:10%]'.")
  try:
    tfds.core.ReadInstruction.from_spec(split)
  except ValueError as e:
    reason = str(e).strip().splitlines()[-1].split(". See format")[0]  # TFDS: a header line, then the reason.
    raise DatasetError(f"{key} {split!r} is not a valid TFDS split ({reason}); write e.g. 'train', 'train[:10%]', "
                       "'validation[:100]' or 'train+validation'.") from None


def check_manual_dir(spec, data_dir, manual_dir):
  """DatasetError unless `manual_dir` holds every file of `spec.manual_files` (Cityscapes' manual download), each a
  readable zip archive: checked before TFDS starts extracting, so a bad file is one line, without TFDS' progress."""
  present = set(tf.io.gfile.listdir(manual_dir)) if manual_dir and tf.io.gfile.isdir(manual_dir) else set()
  missing = [f for f in spec.manual_files if f not in present]
  if missing:
    raise DatasetError(
        f"{spec.name} is not prepared in data_dir {data_dir!r} and manual_dir {manual_dir!r} lacks "
        f"{', '.join(missing)}: download {' and '.join(spec.manual_files)} from https://www.cityscapes-dataset.com "
        f"(registration required), put them in one folder and pass it as manual_dir.")
  for name in spec.manual_files:
    # A zip ends with its end-of-central-directory record (within the last 64 KiB + 98 bytes); zipfile reads it from
    # a copy of the tail (GFile raises tf's errors where zipfile expects OSError, e.g. seeking before the start).
    with tf.io.gfile.GFile(os.path.join(manual_dir, name), "rb") as archive:
      archive.seek(max(0, archive.size() - (1 << 16) - 98))
      tail = archive.read()
    if not zipfile.is_zipfile(io.BytesIO(tail)):
      raise _unreadable_file(spec, manual_dir, name)


def _unreadable_file(spec, manual_dir, name):
  path = os.path.join(manual_dir, name)
  size = tf.io.gfile.stat(path).length if tf.io.gfile.exists(path) else None
  what = f"manual_dir file {path} is {'empty (0 bytes)' if size == 0 else 'not a readable zip archive'}"
  return DatasetError(f"{what}: {spec.name} needs {' and '.join(spec.manual_files)} as downloaded from "
                      "https://www.cityscapes-dataset.com (registration required); download the file again.")


def unreadable_manual_file(spec, manual_dir, error):
  """The DatasetError for `error`, TFDS' failure to extract a file of `manual_dir` (e.g. a zip truncated inside):
  names the file and what `spec` expects there."""
  name = next((f for f in spec.manual_files if f in str(error)), None)
  if name is not None:
    return _unreadable_file(spec, manual_dir, name)
  return DatasetError(f"{spec.name}'s manual download in {manual_dir} could not be extracted "
                      f"({' '.join(str(error).split())}): {spec.name} needs {' and '.join(spec.manual_files)} as "
                      "downloaded from https://www.cityscapes-dataset.com (registration required); download the "
                      "file again.")


def skip_decoding(spec):
  """The TFDS `decoders` argument that leaves `spec`'s image features encoded (decoded by `decode_example`)."""
  if spec.tfds_name.startswith("cityscapes"):
    keys = ("image_left", "segmentation_label")
  elif spec.tfds_name.startswith("tfreward_shapes"):
    keys = ("image", "segmentation_mask")
  else:
    keys = ("image",)
  return {key: tfds.decode.SkipDecoding() for key in keys}


def _decode_image(features, key, encoded):
  """Decodes one image feature with its TFDS connector (its own format and static shape)."""
  return features[key].decode_example(encoded)


def _objects(objects):
  """TFDS `objects` Sequence -> boxes [N, 4] float32, classes [N] int32; every field must have the same N."""
  boxes = tf.reshape(tf.cast(objects["bbox"], tf.float32), [-1, 4])
  classes = tf.cast(objects["label"], tf.int32)
  tf.debugging.assert_equal(tf.shape(classes)[0], tf.shape(boxes)[0],
                            message="objects/bbox and objects/label differ in length")
  return boxes, classes


def decode_shapes(example, features):
  """tfreward_shapes example (images encoded) -> common dict with boxes, classes, crowd and mask."""
  boxes, classes = _objects(example["objects"])
  mask = _decode_image(features, "segmentation_mask", example["segmentation_mask"])
  return {
      "image": _decode_image(features, "image", example["image"]),
      "image_id": tf.cast(example["image/id"], tf.int64),
      "boxes": boxes,
      "classes": classes,
      "crowd": tf.zeros_like(classes, tf.bool),
      "mask": tf.cast(mask[..., 0], tf.int32),
  }


def decode_coco(example, features):
  """coco/2017 example (image encoded) -> common dict with boxes, classes and crowd (no mask)."""
  boxes, classes = _objects(example["objects"])
  crowd = tf.cast(example["objects"]["is_crowd"], tf.bool)
  tf.debugging.assert_equal(tf.shape(crowd)[0], tf.shape(boxes)[0],
                            message="objects/bbox and objects/is_crowd differ in length")
  return {
      "image": _decode_image(features, "image", example["image"]),
      "image_id": tf.cast(example["image/id"], tf.int64),
      "boxes": boxes,
      "classes": classes,
      "crowd": crowd,
  }


def cityscapes_train_ids(label_ids):
  """Raw Cityscapes label ids (any integer dtype, any shape) -> int32 training ids, `IGNORE_INDEX` elsewhere."""
  table = [IGNORE_INDEX] * 256
  for label_id, train_id in CITYSCAPES_LABEL_TO_TRAIN_ID.items():
    table[label_id] = train_id
  return tf.gather(tf.constant(table, tf.int32), tf.cast(label_ids, tf.int32))


def decode_cityscapes(example, features):
  """cityscapes/semantic_segmentation example (images encoded) -> common dict with the 19-class mask, no boxes."""
  labels = _decode_image(features, "segmentation_label", example["segmentation_label"])
  return {
      "image": _decode_image(features, "image_left", example["image_left"]),
      "image_id": tf.strings.to_hash_bucket_fast(example["image_id"], 2**63 - 1),
      "boxes": tf.zeros([0, 4], tf.float32),
      "classes": tf.zeros([0], tf.int32),
      "crowd": tf.zeros([0], tf.bool),
      "mask": cityscapes_train_ids(labels[..., 0]),
  }


def decode_example(spec, example, *, features):
  """Decodes one TFDS example of `spec`'s dataset (read with `skip_decoding(spec)`) into the common dict.

  Args:
    spec: DatasetSpec.
    example: dict of tensors as TFDS yields it, image features still encoded (scalar tf.string).
    features: the builder's `info.features` (a `tfds.features.FeaturesDict`), which decodes them.

  Returns:
    The common example dict described in the module docstring.
  """
  if spec.tfds_name.startswith("cityscapes"):
    return decode_cityscapes(example, features)
  if spec.tfds_name.startswith("tfreward_shapes"):
    return decode_shapes(example, features)
  return decode_coco(example, features)
