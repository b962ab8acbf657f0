"""COCO and Cityscapes pipelines on `tfds.testing.mock_data` examples (no network, no prepared data).

`mock_data`'s default generator fills each field of a `Sequence` with its own random length (for coco/2017, 28
boxes but 45 labels), so the tests hand it an `as_dataset_fn` that yields consistent, hand-made examples; the
pipeline stays strict (see `test_inconsistent_mock_examples_are_rejected`).
"""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

import mock_tfds

from tfreward.data import decoders
from tfreward.data import pipeline
from tfreward.data import transforms

COCO_HW = ((48, 64), (64, 40), (30, 30))
# Per example: (bbox yxyx normalised, label, is_crowd). Crowd regions use class 79 only.
COCO_OBJECTS = (
    [((0.1, 0.1, 0.5, 0.6), 3, False), ((0.0, 0.0, 1.0, 1.0), 79, True), ((0.5, 0.5, 0.9, 0.8), 0, False)],
    [((0.2, 0.3, 0.7, 0.9), 12, False)],
    [],
)
CITY_HW = mock_tfds.CITYSCAPES_HW


def _coco_examples(split):
  del split
  rng = np.random.default_rng(0)
  for i, (hw, objects) in enumerate(zip(COCO_HW, COCO_OBJECTS)):
    yield mock_tfds.coco_example(i, hw, objects, rng)


@pytest.fixture
def coco_mock():
  with mock_tfds.mock_coco(_coco_examples):
    yield


@pytest.fixture
def city_mock(tmp_path):
  with mock_tfds.mock_cityscapes(str(tmp_path / "manual")) as manual_dir:
    yield manual_dir


def _coco(training, **kwargs):
  args = dict(dataset="coco/2017", task="detection", split="train" if training else "validation",
              training=training, image_size=(32, 48), global_batch_size=2, max_instances=4, seed=3)
  args.update(kwargs)
  return pipeline.build_dataset(**args)


def test_coco_eval_keeps_crowd_flagged_and_maps_boxes(coco_mock):
  ds = _coco(False)
  images_spec, labels_spec = ds.element_spec
  assert images_spec.shape == (2, 32, 48, 3) and images_spec.dtype == tf.uint8
  assert {k: (tuple(v.shape), v.dtype) for k, v in labels_spec.items()} == {
      "boxes": ((2, 4, 4), tf.float32), "classes": ((2, 4), tf.int32), "valid": ((2, 4), tf.bool),
      "crowd": ((2, 4), tf.bool), "image_id": ((2,), tf.int64), "image_hw": ((2, 2), tf.int32),
      "scale": ((2,), tf.float32), "example_valid": ((2,), tf.bool)}
  batches = list(ds.as_numpy_iterator())
  assert len(batches) == 2  # 3 examples, batch 2: the last batch is padded.
  labels = {k: np.concatenate([b[1][k] for b in batches]) for k in labels_spec}
  np.testing.assert_array_equal(labels["example_valid"], [True, True, True, False])
  np.testing.assert_array_equal(labels["image_id"], [100, 101, 102, -1])
  np.testing.assert_array_equal(labels["image_hw"], [*COCO_HW, (0, 0)])
  for i, objects in enumerate(COCO_OBJECTS):
    n = len(objects)
    np.testing.assert_array_equal(labels["classes"][i, :n], [o[1] for o in objects])
    np.testing.assert_array_equal(labels["crowd"][i, :n], [o[2] for o in objects])
    np.testing.assert_array_equal(labels["valid"][i, :n], [not o[2] for o in objects])
    assert np.all(labels["classes"][i, n:] == -1) and not labels["valid"][i, n:].any()
    assert not labels["crowd"][i, n:].any() and np.all(labels["boxes"][i, n:] == 0)
    scale = transforms.fit_scale(COCO_HW[i], (32, 48))
    np.testing.assert_allclose(labels["scale"][i], scale.numpy(), rtol=1e-6)
    if n:
      expected = transforms.original_boxes_to_canvas(
          np.array([o[0] for o in objects], np.float32), COCO_HW[i], scale, (32, 48))
      np.testing.assert_allclose(labels["boxes"][i, :n], expected.numpy(), atol=1e-6)
  # The dummy example is all padding.
  assert np.all(batches[-1][0][1] == 0) and np.all(labels["classes"][3] == -1) and not labels["crowd"][3].any()


def test_coco_training_drops_crowd(coco_mock):
  # Scale 1 (no crop): every non-crowd box survives, so the count is exact.
  ds = _coco(True, scale_range=(1.0, 1.0))
  assert "crowd" not in ds.element_spec[1]
  for images, labels in ds.take(6).as_numpy_iterator():
    assert images.shape == (2, 32, 48, 3)
    for i in range(2):
      classes = labels["classes"][i][labels["valid"][i]]
      assert 79 not in classes
      by_count = {2: {0, 3}, 1: {12}, 0: set()}
      assert set(classes.tolist()) == by_count[len(classes)]
      assert np.all(labels["classes"][i][~labels["valid"][i]] == -1)
      assert labels["boxes"].min() >= 0.0 and labels["boxes"].max() <= 1.0
    assert labels["example_valid"].all()


def test_coco_keeps_the_first_max_instances(coco_mock):
  images, labels = next(_coco(False, max_instances=1).as_numpy_iterator())
  assert labels["classes"].shape == (2, 1)
  np.testing.assert_array_equal(labels["classes"][:, 0], [3, 12])


def test_inconsistent_objects_are_rejected():
  # mock_data's own generator would give Sequence fields different lengths; TFDS refuses to encode those, and
  # the decoder refuses them too instead of silently pairing boxes with the wrong labels.
  features = tfds.builder("coco/2017").info.features
  example = {
      "image": tf.constant(features["image"].encode_example(np.zeros([8, 8, 3], np.uint8))),
      "image/id": tf.constant(1, tf.int64),
      "objects": {"bbox": tf.zeros([3, 4]), "label": tf.zeros([2], tf.int64), "is_crowd": tf.zeros([3], tf.bool)},
  }
  spec = decoders.get_spec("coco/2017")
  with pytest.raises(tf.errors.InvalidArgumentError, match="differ in length"):
    decoders.decode_example(spec, example, features=features)
  ds = tf.data.Dataset.from_tensors(example).map(lambda ex: decoders.decode_example(spec, ex, features=features))
  with pytest.raises(tf.errors.InvalidArgumentError, match="differ in length"):
    list(ds)
  consistent = dict(example, objects=dict(example["objects"], label=tf.zeros([3], tf.int64)))
  decoded = decoders.decode_example(spec, consistent, features=features)
  assert decoded["boxes"].shape == (3, 4) and decoded["image"].shape == (8, 8, 3)


def test_coco_not_prepared_says_how_to_build(tmp_path):
  with pytest.raises(ValueError, match=r"not prepared .*tfds build coco/2017 --data_dir"):
    _coco(False, data_dir=str(tmp_path))


def test_cityscapes_eval_maps_label_ids_and_pads_with_ignore(city_mock):
  ds = pipeline.build_dataset(dataset="cityscapes", task="segmentation", split="validation", training=False,
                              image_size=(64, 96), global_batch_size=2, manual_dir=city_mock)
  images_spec, labels_spec = ds.element_spec
  assert images_spec.shape == (2, 64, 96, 3)
  assert {k: (tuple(v.shape), v.dtype) for k, v in labels_spec.items()} == {
      "mask": ((2, 64, 96), tf.int32), "image_id": ((2,), tf.int64), "image_hw": ((2, 2), tf.int32),
      "scale": ((2,), tf.float32), "example_valid": ((2,), tf.bool)}
  (images, labels), = list(ds.as_numpy_iterator())
  np.testing.assert_array_equal(labels["image_hw"], [CITY_HW, CITY_HW])
  assert labels["image_id"][0] != labels["image_id"][1] and labels["example_valid"].all()
  # 1024 x 2048 fits as 48 x 96: rows 48.. are padding.
  np.testing.assert_allclose(labels["scale"], 96 / 2048)
  mask = labels["mask"]
  assert np.all(mask[:, 48:] == 255) and np.all(images[:, 48:] == 0)
  expected = decoders.cityscapes_train_ids(mock_tfds.cityscapes_label_ids()[:, :, 0]).numpy()
  resized = tf.image.resize(expected[None, :, :, None], (48, 96), method="nearest").numpy()[0, :, :, 0]
  np.testing.assert_array_equal(mask[0, :48], resized)
  assert set(np.unique(mask)) <= set(range(19)) | {255}
  assert len(set(np.unique(mask[:, :48])) - {255}) >= 15  # Most training ids appear among the stripes.
  assert images[0, :40, :40].mean() == pytest.approx(40, abs=1)
  assert images[1, :40, :40].mean() == pytest.approx(80, abs=1)


def test_cityscapes_training_batches(city_mock):
  ds = pipeline.build_dataset(dataset="cityscapes", task="segmentation", split="train", training=True,
                              image_size=(64, 96), global_batch_size=2, manual_dir=city_mock, seed=0)
  for images, labels in ds.take(2).as_numpy_iterator():
    assert images.shape == (2, 64, 96, 3) and labels["mask"].shape == (2, 64, 96)
    assert set(np.unique(labels["mask"])) <= set(range(19)) | {255}
    assert (labels["mask"] != 255).any()


def test_cityscapes_train_id_table():
  ids = decoders.cityscapes_train_ids(tf.range(256, dtype=tf.int32)).numpy()
  assert sorted(ids[ids != 255].tolist()) == list(range(19))
  assert ids[7] == 0 and ids[26] == 13 and ids[33] == 18 and ids[0] == 255 and ids[34] == 255
  assert np.all(ids[34:] == 255)


@pytest.mark.parametrize("files", [None, (), ("leftImg8bit_trainvaltest.zip",)])
def test_cityscapes_needs_manual_dir(tmp_path, files):
  manual_dir = None
  if files is not None:
    manual_dir = tmp_path / "manual"
    manual_dir.mkdir()
    for name in files:
      (manual_dir / name).write_bytes(b"")
  # Even under mock_data (which makes download_and_prepare a no-op) an unprepared Cityscapes needs manual_dir.
  with tfds.testing.mock_data(as_dataset_fn=mock_tfds.consistent_as_dataset(mock_tfds.cityscapes_examples),
                              policy=tfds.testing.MockPolicy.USE_CODE):
    with pytest.raises(ValueError, match=r"manual_dir.*gtFine_trainvaltest.zip"):
      pipeline.build_dataset(dataset="cityscapes", task="segmentation", split="train", training=True,
                             image_size=(64, 96), global_batch_size=2,
                             manual_dir=None if manual_dir is None else str(manual_dir))


@pytest.mark.parametrize("dataset, task", [("coco/2017", "segmentation"), ("cityscapes", "detection")])
def test_unsupported_task(dataset, task):
  with pytest.raises(ValueError, match=f"supports only .*got task '{task}'"):
    pipeline.build_dataset(dataset=dataset, task=task, split="train", training=True, image_size=(8, 8),
                           global_batch_size=2)


def test_specs():
  coco = pipeline.dataset_spec("coco/2017")
  assert coco.num_classes == 80 and coco.tasks == ("detection",) and coco.num_segmentation_classes == 0
  assert len(set(decoders.COCO_CATEGORY_IDS)) == 80 and decoders.COCO_CATEGORY_IDS[-1] == 90
  city = pipeline.dataset_spec("cityscapes/semantic_segmentation")
  assert city.num_classes_for("segmentation") == 19 and city.ignore_index == 255
  assert city.tfds_name == "cityscapes/semantic_segmentation" and city.manual_files


def _ids_by_pipeline(build):
  """Valid image ids seen by each of two input pipelines (one replica each) and by one pipeline alone."""
  contexts = [tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=p, num_replicas_in_sync=2)
              for p in range(2)]
  seen = []
  for context in (*contexts, None):
    ids = [labels["image_id"][labels["example_valid"]] for _, labels in build(context).as_numpy_iterator()]
    seen.append(np.concatenate(ids).tolist())
  return seen


@pytest.mark.parametrize("dataset", ["coco/2017", "cityscapes"])
def test_evaluation_over_two_input_pipelines_sees_every_example_once(dataset, coco_mock, tmp_path):
  """COCO (3 examples) and Cityscapes (mock) validation over a fake 2-pipeline InputContext: the pipelines' shards
  are disjoint and together are the split, in the order of one pipeline."""
  manual_dir = tmp_path / "manual"
  mock_tfds.write_empty_manual_zips(str(manual_dir))
  task = "detection" if dataset == "coco/2017" else "segmentation"
  examples = _coco_examples if dataset == "coco/2017" else mock_tfds.cityscapes_examples
  with tfds.testing.mock_data(as_dataset_fn=mock_tfds.consistent_as_dataset(examples),
                              policy=tfds.testing.MockPolicy.USE_CODE):
    first, second, alone = _ids_by_pipeline(lambda context: pipeline.build_dataset(
        dataset=dataset, task=task, split="validation", training=False, image_size=(32, 48), global_batch_size=2,
        manual_dir=str(manual_dir), input_context=context))
  assert len(alone) == len(set(alone)) >= 2
  assert not set(first) & set(second) and sorted(first + second) == sorted(alone)
