"""TFDS mock data for COCO and Cityscapes with hand-made, consistent examples (no network, no prepared data).

`tfds.testing.mock_data`'s default generator fills each field of a `Sequence` with its own random length (for
coco/2017, 28 boxes but 45 labels), so these mocks hand it an `as_dataset_fn` that encodes examples made here with
the builder's own features; the pipeline stays strict (tests/data/test_decoders.py checks it rejects the default
mock). Importable from every test (tests/conftest.py puts this folder on sys.path) and from the helper scripts run as
subprocesses.
"""

import contextlib
import io
import os
import zipfile

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from PIL import Image

from tfreward.data import decoders

CITYSCAPES_HW = (1024, 2048)  # the builder's declared image shape: decoding sets it without checking


def consistent_as_dataset(make_examples):
  """An `as_dataset_fn` for `mock_data` that encodes `make_examples(split)` with the builder's own features."""

  def as_dataset(self, split, decoders=None, read_config=None, **kwargs):
    del read_config, kwargs
    features = self.info.features
    specs = features.get_serialized_info()  # Nested dicts of TensorInfo.
    flat_specs = tf.nest.flatten(specs)

    def to_arrays(spec, value):  # Sequence fields encode as lists: stack them, empty ones included.
      if isinstance(spec, dict):
        return {key: to_arrays(spec[key], value[key]) for key in spec}
      return np.asarray(value, dtype=spec.np_dtype).reshape([-1 if d is None else d for d in spec.shape])

    encoded = [tf.nest.flatten(to_arrays(specs, features.encode_example(example)))
               for example in make_examples(split)]
    signature = tuple(tf.TensorSpec(s.shape, s.tf_dtype) for s in flat_specs)
    ds = tf.data.Dataset.from_generator(lambda: (tuple(e) for e in encoded), output_signature=signature)
    ds = ds.apply(tf.data.experimental.assert_cardinality(len(encoded)))
    ds = ds.map(lambda *flat: tf.nest.pack_sequence_as(specs, list(flat)))
    return ds.map(lambda ex: features.decode_example(ex, decoders=decoders))

  return as_dataset


def coco_example(index, image_hw, objects, rng):
  """One coco/2017 example: `objects` a list of (bbox yxyx normalised, label, is_crowd); a noise image."""
  return {
      "image": rng.integers(0, 255, [*image_hw, 3], dtype=np.uint8),
      "image/filename": f"{index:012d}.jpg",
      "image/id": 100 + index,
      "objects": {
          "bbox": np.array([o[0] for o in objects], np.float32).reshape([-1, 4]),
          "label": np.array([o[1] for o in objects], np.int64),
          "is_crowd": np.array([o[2] for o in objects], bool),
          "area": np.arange(len(objects), dtype=np.int64),
          "id": np.arange(len(objects), dtype=np.int64),
      },
  }


def random_objects(rng, count, min_side=0.02, max_side=0.3):
  """`count` non-crowd objects with random boxes (yxyx in [0, 1]) and labels in [0, 80)."""
  sides = rng.uniform(min_side, max_side, [count, 2])
  tops = rng.uniform(0, 1, [count, 2]) * (1 - sides)
  boxes = np.concatenate([tops, tops + sides], axis=1)
  return [(tuple(box), int(rng.integers(0, 80)), False) for box in boxes]


def coco_realistic_examples(split, num_examples=6):
  """COCO-sized examples (the sizes of real COCO images): crowd regions, an image without objects, one with more
  objects than a config's `max_instances` (130 > 100), a crowd-only image. The same content on every split."""
  del split
  rng = np.random.default_rng(0)
  sizes = ((480, 640), (427, 640), (640, 480), (375, 500), (640, 427), (512, 640))
  layouts = (
      random_objects(rng, 4) + [((0.0, 0.0, 1.0, 1.0), 0, True)],
      [],
      random_objects(rng, 130, 0.02, 0.1),
      [((0.2, 0.2, 0.8, 0.8), 17, True)],
      random_objects(rng, 12),
      random_objects(rng, 1, 0.4, 0.9),
  )
  for i in range(num_examples):
    yield coco_example(i, sizes[i % len(sizes)], layouts[i % len(layouts)], rng)


def cityscapes_label_ids():
  """A raw label map [1024, 2048, 1] uint8: vertical stripes of label ids 0..33 and one of the unused id 255."""
  stripes = np.concatenate([np.arange(34), [255]]).astype(np.uint8)
  columns = stripes[np.arange(CITYSCAPES_HW[1]) * len(stripes) // CITYSCAPES_HW[1]]
  return np.broadcast_to(columns[None, :, None], (*CITYSCAPES_HW, 1)).copy()


def cityscapes_examples(split, num_examples=2):
  """Cityscapes-sized examples: half the image flat grey (brighter per example), the label map in stripes."""
  for i in range(num_examples):
    image = np.zeros([*CITYSCAPES_HW, 3], np.uint8)
    image[:, : CITYSCAPES_HW[1] // 2] = 40 * (i + 1)
    yield {"image_id": f"bonn_00000{i}_000019_{split}", "image_left": image,
           "segmentation_label": cityscapes_label_ids()}


@contextlib.contextmanager
def mock_coco(make_examples=coco_realistic_examples):
  """Every coco/2017 split reads `make_examples(split)`."""
  with tfds.testing.mock_data(as_dataset_fn=consistent_as_dataset(make_examples),
                              policy=tfds.testing.MockPolicy.USE_CODE):
    yield


def write_empty_manual_zips(manual_dir):
  """Cityscapes' manual download files in `manual_dir` (created if needed) as valid, empty zip archives: what the
  pipeline's checks need when the builder is mocked and never opens them."""
  os.makedirs(manual_dir, exist_ok=True)
  for name in decoders.CITYSCAPES_MANUAL_FILES:
    with zipfile.ZipFile(os.path.join(manual_dir, name), "w"):
      pass


@contextlib.contextmanager
def mock_cityscapes(manual_dir, make_examples=cityscapes_examples):
  """Every cityscapes split reads `make_examples(split)`; `manual_dir` gets the zips the pipeline checks for, valid
  and empty (the mocked builder never opens them). Yields the manual dir."""
  write_empty_manual_zips(manual_dir)
  with tfds.testing.mock_data(as_dataset_fn=consistent_as_dataset(make_examples),
                              policy=tfds.testing.MockPolicy.USE_CODE):
    yield manual_dir


# A fake Cityscapes manual download, prepared by TFDS' real builder (no mock): TFDS split -> (Cityscapes folder,
# image ids as (city, sequence, frame)); the cities as in the real data (the builder wants `[a-z\\-]+` names).
CITYSCAPES_ARCHIVE_SPLITS = {
    "train": ("train", (("aachen", 0, 19), ("aachen", 1, 19), ("bochum", 0, 1000))),
    "validation": ("val", (("frankfurt", 0, 294), ("munster", 3, 19))),
    "test": ("test", (("berlin", 0, 19), ("mainz", 1, 5))),
}
CITYSCAPES_CELL_HW = (256, 128)


def cityscapes_image_id(city, seq, frame):
  return f"{city}_{seq:06d}_{frame:06d}"


def cityscapes_raw_labels(index):
  """Example `index`'s raw label id map [1024, 2048] uint8: a grid of 4 x 16 cells of 256 x 128 pixels, cell (i, j)
  holding id (7 * index + 16 * i + j) % 34."""
  rows, cols = CITYSCAPES_HW[0] // CITYSCAPES_CELL_HW[0], CITYSCAPES_HW[1] // CITYSCAPES_CELL_HW[1]
  cells = (7 * index + 16 * np.arange(rows)[:, None] + np.arange(cols)[None, :]) % 34
  return np.kron(cells, np.ones(CITYSCAPES_CELL_HW, np.int64)).astype(np.uint8)


def cityscapes_image(index):
  """The left image [1024, 2048, 3] uint8: a colour per raw label id, shifted per example."""
  raw = cityscapes_raw_labels(index).astype(np.int64)
  return np.stack([(raw * 7 + 20 * index) % 256, (raw * 37) % 256, 255 - raw * 5], axis=-1).astype(np.uint8)


def cityscapes_archive_examples():
  """(TFDS split, image id, example index) of every example of the archive; the index picks its content."""
  index = 0
  for split, (_, ids) in CITYSCAPES_ARCHIVE_SPLITS.items():
    for city_seq_frame in ids:
      yield split, cityscapes_image_id(*city_seq_frame), index
      index += 1


def _png(array):
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format="PNG")
  return buffer.getvalue()


def write_cityscapes_archive(path):
  """Writes the two zips Cityscapes' TFDS builder reads (`leftImg8bit/<split>/<city>/<id>_leftImg8bit.png`,
  `gtFine/<split>/<city>/<id>_gtFine_labelIds.png`) into folder `path`; flat content keeps them a few KB."""
  os.makedirs(path, exist_ok=True)
  folders = {split: folder for split, (folder, _) in CITYSCAPES_ARCHIVE_SPLITS.items()}
  with zipfile.ZipFile(os.path.join(path, "leftImg8bit_trainvaltest.zip"), "w") as left, \
       zipfile.ZipFile(os.path.join(path, "gtFine_trainvaltest.zip"), "w") as fine:
    for split, image_id, index in cityscapes_archive_examples():
      city = image_id.split("_")[0]
      left.writestr(f"leftImg8bit/{folders[split]}/{city}/{image_id}_leftImg8bit.png", _png(cityscapes_image(index)))
      fine.writestr(f"gtFine/{folders[split]}/{city}/{image_id}_gtFine_labelIds.png",
                    _png(cityscapes_raw_labels(index)))
  return path
