"""Input pipeline end to end on tfreward_shapes/test (40 train / 10 validation, generated locally)."""

import re
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from tfreward.data import decoders
from tfreward.data import pipeline
from tfreward.data import sharding
from tfreward.data import shapes
from tfreward.data import transforms
from tfreward.ops import boxes as box_ops

NAME = "tfreward_shapes/test"
SIZE = (96, 128)  # The 128 x 128 images fit as 96 x 96: columns 96.. are padding.
NUM_VALIDATION = 10


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tfds"))
  shapes.ensure_built(NAME, path)
  return path


def _build(data_dir, *, training, task="detection", **kwargs):
  args = dict(dataset=NAME, task=task, split="train" if training else "validation", training=training,
              image_size=SIZE, global_batch_size=4, max_instances=8, data_dir=data_dir, seed=7)
  args.update(kwargs)
  return pipeline.build_dataset(**args)


def _concat(batches):
  return {key: np.concatenate([labels[key] for _, labels in batches]) for key in batches[0][1]}


def _raw_validation(data_dir):
  """image/id -> (bbox [N, 4], label [N]) straight from TFDS."""
  builder = shapes.ensure_built(NAME, data_dir)
  return {int(ex["image/id"]): (ex["objects"]["bbox"], ex["objects"]["label"])
          for ex in builder.as_dataset(split="validation").as_numpy_iterator()}


def test_eval_detection_shapes_padding_and_geometry(data_dir):
  ds = _build(data_dir, training=False)
  images_spec, labels_spec = ds.element_spec
  assert images_spec.shape == (4, *SIZE, 3) and images_spec.dtype == tf.uint8
  assert {k: (tuple(v.shape), v.dtype) for k, v in labels_spec.items()} == {
      "boxes": ((4, 8, 4), tf.float32), "classes": ((4, 8), tf.int32), "valid": ((4, 8), tf.bool),
      "crowd": ((4, 8), tf.bool), "image_id": ((4,), tf.int64), "image_hw": ((4, 2), tf.int32),
      "scale": ((4,), tf.float32), "example_valid": ((4,), tf.bool)}
  batches = list(ds.as_numpy_iterator())
  assert len(batches) == 3  # 10 examples in batches of 4: the last one has 2 dummies.
  labels = _concat(batches)
  np.testing.assert_array_equal(labels["example_valid"], [True] * 10 + [False] * 2)
  raw = _raw_validation(data_dir)
  assert sorted(labels["image_id"][:10].tolist()) == sorted(raw)
  assert not labels["crowd"].any()
  for i in range(10):
    bbox, label = raw[int(labels["image_id"][i])]
    n = len(label)
    expected = transforms.original_boxes_to_canvas(bbox, (128, 128), 0.75, SIZE).numpy()
    np.testing.assert_allclose(labels["boxes"][i, :n], expected, atol=1e-6)
    np.testing.assert_array_equal(labels["classes"][i, :n], label)
    assert labels["valid"][i, :n].all() and not labels["valid"][i, n:].any()
    assert np.all(labels["classes"][i, n:] == -1) and np.all(labels["boxes"][i, n:] == 0)
  np.testing.assert_array_equal(labels["image_hw"][:10], [[128, 128]] * 10)
  np.testing.assert_allclose(labels["scale"][:10], 0.75)
  # Dummy examples: all padding.
  last_images = batches[-1][0]
  assert np.all(last_images[2:] == 0) and np.all(labels["image_id"][10:] == -1)
  assert np.all(labels["classes"][10:] == -1) and not labels["valid"][10:].any()
  # Padded canvas columns are black in real examples too.
  assert np.all(last_images[:2, :, 96:] == 0) and last_images[:2, :, :96].mean() > 10


def test_eval_segmentation_mask_and_padding(data_dir):
  ds = _build(data_dir, training=False, task="segmentation", global_batch_size=3)
  assert set(ds.element_spec[1]) == {"mask", "image_id", "image_hw", "scale", "example_valid"}
  batches = list(ds.as_numpy_iterator())
  assert len(batches) == 4
  labels = _concat(batches)
  np.testing.assert_array_equal(labels["example_valid"], [True] * 10 + [False] * 2)
  mask = labels["mask"]
  assert mask.shape == (12, *SIZE) and mask.dtype == np.int32
  assert np.all(mask[:, :, 96:] == 255) and np.all(mask[10:] == 255)
  assert set(np.unique(mask[:10, :, :96])) <= set(range(7)) and (mask[:10, :, :96] > 0).any()


@pytest.mark.parametrize("training", [True, False])
def test_mask_values_outside_the_classes_fail_clearly(data_dir, monkeypatch, training):
  decode = decoders.decode_example

  def corrupt(spec, example, *, features):  # one pixel of class 7 in a 7-class (0..6) dataset
    decoded = decode(spec, example, features=features)
    decoded["mask"] = tf.tensor_scatter_nd_update(decoded["mask"], [[3, 4]], [7])
    return decoded

  monkeypatch.setattr(decoders, "decode_example", corrupt)
  ds = _build(data_dir, training=training, task="segmentation")
  with pytest.raises(tf.errors.InvalidArgumentError, match=r"outside the classes \[0, 7\) and the ignore index 255"):
    next(iter(ds))


def test_check_mask_values_keeps_classes_and_the_ignore_index():
  mask = tf.constant([[0, 6, 255]], tf.int32)
  np.testing.assert_array_equal(pipeline.check_mask_values(mask, 7, 255, "x"), mask)
  for bad in (-1, 7, 254):
    with pytest.raises(tf.errors.InvalidArgumentError, match="first bad value"):
      pipeline.check_mask_values(tf.constant([[0, bad]]), 7, 255, "x")


def test_max_examples(data_dir):
  labels = _concat(list(_build(data_dir, training=False, max_examples=5).as_numpy_iterator()))
  np.testing.assert_array_equal(labels["example_valid"], [True] * 5 + [False] * 3)


def _train_pairs(data_dir, seed, steps=3, **kwargs):
  """Detection and segmentation batches of the same seed: the same examples with the same augmentation."""
  det = list(_build(data_dir, training=True, seed=seed, **kwargs).take(steps).as_numpy_iterator())
  seg = list(_build(data_dir, training=True, task="segmentation", seed=seed, **kwargs).take(steps)
             .as_numpy_iterator())
  return det, seg


@pytest.mark.parametrize("scale_range", [(0.8, 1.25), (1.5, 2.0)])
def test_training_boxes_follow_flip_and_scale_jitter(data_dir, scale_range):
  det, seg = _train_pairs(data_dir, seed=11, scale_range=scale_range)
  for (det_images, d), (seg_images, s) in zip(det, seg):
    np.testing.assert_array_equal(det_images, seg_images)
    np.testing.assert_array_equal(d["image_id"], s["image_id"])
    assert det_images.shape == (4, *SIZE, 3) and d["boxes"].shape == (4, 8, 4)
    assert d["boxes"].min() >= 0.0 and d["boxes"].max() <= 1.0 and np.all(np.isfinite(d["boxes"]))
    assert d["example_valid"].all() and "crowd" not in d
    for i in range(4):
      valid = d["valid"][i]
      assert np.all(d["classes"][i][~valid] == -1) and np.all(d["boxes"][i][~valid] == 0)
      assert np.all(box_ops.box_area(d["boxes"][i][valid]).numpy() > 0)
      pixels = d["boxes"][i][valid] * np.array([*SIZE, *SIZE])
      classes = d["classes"][i][valid]
      for c in range(shapes.NUM_CLASSES):  # Every pixel of class c lies in some box of class c.
        ys, xs = np.nonzero(s["mask"][i] == c + 1)
        if ys.size == 0:
          continue
        boxes_c = pixels[classes == c]
        assert boxes_c.size, f"class {c} has mask pixels but no box"
        cy, cx = ys[:, None] + 0.5, xs[:, None] + 0.5
        inside = ((cy >= boxes_c[:, 0] - 1e-3) & (cy <= boxes_c[:, 2] + 1e-3) &
                  (cx >= boxes_c[:, 1] - 1e-3) & (cx <= boxes_c[:, 3] + 1e-3)).any(axis=1)
        assert inside.all()


def test_training_is_seeded(data_dir):
  a = next(_build(data_dir, training=True, seed=5).as_numpy_iterator())
  b = next(_build(data_dir, training=True, seed=5).as_numpy_iterator())
  c = next(_build(data_dir, training=True, seed=6).as_numpy_iterator())
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1]["boxes"], b[1]["boxes"])
  assert not np.array_equal(a[0], c[0])


def test_training_flip_mirrors_boxes(data_dir):
  # Without scale jitter (scale exactly the fit scale) a flipped example's boxes are mirrored inside the
  # 96 x 96 image area; compare with the unflipped pipeline of the same seed.
  plain = list(_build(data_dir, training=True, hflip=False, scale_range=(1.0, 1.0), seed=3).take(5)
               .as_numpy_iterator())
  flip = list(_build(data_dir, training=True, hflip=True, scale_range=(1.0, 1.0), seed=3).take(5)
              .as_numpy_iterator())
  image_w = 96 / SIZE[1]
  mirrored = same = 0
  for (pi, p), (fi, f) in zip(plain, flip):
    np.testing.assert_array_equal(p["image_id"], f["image_id"])
    for i in range(4):
      v = p["valid"][i]
      pb, fb = p["boxes"][i][v], f["boxes"][i][v]
      np.testing.assert_array_equal(p["classes"][i], f["classes"][i])
      if np.allclose(pb, fb, atol=1e-6):
        same += 1
        np.testing.assert_array_equal(pi[i], fi[i])
      else:
        np.testing.assert_allclose(fb[:, [0, 2]], pb[:, [0, 2]], atol=1e-5)
        np.testing.assert_allclose(fb[:, 1], image_w - pb[:, 3], atol=1e-5)
        np.testing.assert_allclose(fb[:, 3], image_w - pb[:, 1], atol=1e-5)
        assert np.abs(fi[i][:, :96].astype(int) - pi[i][:, 95::-1]).max() <= 1
        mirrored += 1
  assert mirrored > 0 and same > 0


def test_batches_compile_with_xla(data_dir):
  images, labels = next(_build(data_dir, training=True).as_numpy_iterator())

  def summary(images, boxes, valid):
    area = tf.reduce_sum(tf.where(valid, box_ops.box_area(boxes), 0.0), axis=1)  # [B]
    return area + tf.reduce_mean(tf.cast(images, tf.float32), axis=[1, 2, 3])

  eager = summary(images, labels["boxes"], labels["valid"])
  xla = tf.function(summary, jit_compile=True)(images, labels["boxes"], labels["valid"])
  np.testing.assert_allclose(xla.numpy(), eager.numpy(), rtol=1e-5)
  assert np.all(np.isfinite(xla.numpy()))


def test_distributed_per_replica_batches(data_dir, two_replica_strategy):
  strategy = two_replica_strategy
  train = pipeline.distributed_dataset(
      strategy, dataset=NAME, task="detection", split="train", training=True, image_size=SIZE,
      global_batch_size=4, max_instances=8, data_dir=data_dir, seed=1)
  images, labels = next(iter(train))
  for part in strategy.experimental_local_results(images):
    assert part.shape == (2, *SIZE, 3)
  for part in strategy.experimental_local_results(labels["boxes"]):
    assert part.shape == (2, 8, 4)
  evaluation = pipeline.distributed_dataset(
      strategy, dataset=NAME, task="detection", split="validation", training=False, image_size=SIZE,
      global_batch_size=4, max_instances=8, data_dir=data_dir)
  ids, valid, steps = [], [], 0
  for _, labels in evaluation:
    steps += 1
    for part_ids, part_valid in zip(strategy.experimental_local_results(labels["image_id"]),
                                    strategy.experimental_local_results(labels["example_valid"])):
      assert part_ids.shape == (2,)  # Every replica gets a full batch, also in the last step.
      ids += part_ids.numpy().tolist()
      valid += part_valid.numpy().tolist()
  assert steps == 3 and sum(valid) == NUM_VALIDATION
  assert valid[8:10] == [True, True] and valid[10:] == [False, False]  # Replica 2's last batch: all padding.
  ids = [i for i, v in zip(ids, valid) if v]
  assert sorted(ids) == sorted(_raw_validation(data_dir))


def test_several_input_pipelines_partition_the_data(data_dir):
  contexts = [tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=p, num_replicas_in_sync=2)
              for p in range(2)]
  evals = [list(_build(data_dir, training=False, global_batch_size=6, input_context=c).as_numpy_iterator())
           for c in contexts]
  assert len(evals[0]) == len(evals[1]) == 2  # ceil(10 / 6) global batches, one per-replica batch each.
  labels = [_concat(e) for e in evals]
  assert labels[0]["image_id"].shape == (6,)
  ids = np.concatenate([l["image_id"][l["example_valid"]] for l in labels])
  assert sorted(ids.tolist()) == sorted(_raw_validation(data_dir))
  # Training, sharded by example: pipeline p serves rows [2p, 2p + 2) of each global batch of one pipeline, with the
  # same augmentation, so two hosts train on exactly the batches of one.
  alone = list(_build(data_dir, training=True, global_batch_size=4).take(5).as_numpy_iterator())
  shards = [list(_build(data_dir, training=True, global_batch_size=4, input_context=c, input_sharding="example")
                 .take(5).as_numpy_iterator()) for c in contexts]
  for step, (images, labels) in enumerate(alone):
    assert shards[0][step][0].shape == (2, *SIZE, 3)
    np.testing.assert_array_equal(np.concatenate([shards[0][step][0], shards[1][step][0]]), images)
    for key in labels:
      np.testing.assert_array_equal(np.concatenate([shards[0][step][1][key], shards[1][step][1][key]]),
                                    labels[key], err_msg=key)


def test_start_batch_resumes_the_training_stream(data_dir):
  """A resumed run's input (start_batch=k) is the uninterrupted stream from global batch k on, across epochs of the
  40 examples (batches of 4: 10 per epoch)."""
  full = list(_build(data_dir, training=True).take(14).as_numpy_iterator())
  resumed = list(_build(data_dir, training=True, start_batch=11).take(3).as_numpy_iterator())
  for (images, labels), (images2, labels2) in zip(full[11:], resumed):
    np.testing.assert_array_equal(images2, images)
    np.testing.assert_array_equal(labels2["image_id"], labels["image_id"])
  with pytest.raises(ValueError, match="start_batch must be a non-negative integer, got -1"):
    _build(data_dir, training=True, start_batch=-1)


def test_file_sharding_reads_each_pipelines_own_files(data_dir, monkeypatch):
  """input_sharding "file" (or "auto" with a file per pipeline) hands TFDS the InputContext; with fewer files than
  pipelines "file" is an error and "auto" falls back to example sharding."""
  seen_contexts = []
  as_dataset = shapes.TfrewardShapes.as_dataset

  def recording_as_dataset(self, *args, read_config=None, **kwargs):
    seen_contexts.append(read_config.input_context)
    # The test dataset has one file per split: read it whole, as TFDS would read this pipeline's share.
    return as_dataset(self, *args, read_config=tfds.ReadConfig(shuffle_seed=read_config.shuffle_seed), **kwargs)

  monkeypatch.setattr(shapes.TfrewardShapes, "as_dataset", recording_as_dataset)
  context = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=1, num_replicas_in_sync=2)
  with pytest.raises(ValueError, match="input_sharding 'file' needs at least one file per input pipeline: the split "
                                       "has 1 file"):
    _build(data_dir, training=True, input_context=context, input_sharding="file")
  _build(data_dir, training=True, input_context=context)  # auto, one file: example sharding
  assert seen_contexts == [None]
  monkeypatch.setattr(sharding, "num_files", lambda builder, split: 2)
  batches = list(_build(data_dir, training=True, input_context=context).take(2).as_numpy_iterator())
  assert seen_contexts[-1] is context and batches[0][0].shape == (2, *SIZE, 3)
  with pytest.raises(ValueError, match="max_examples cannot be combined with input_sharding 'file'"):
    _build(data_dir, training=True, input_context=context, max_examples=8)
  assert sharding.resolve("auto", 4, 1) == "example" and sharding.resolve("example", 4, 2) == "example"
  with pytest.raises(ValueError, match="input_sharding must be one of"):
    sharding.resolve("hosts", 4, 2)


def test_specs():
  spec = pipeline.dataset_spec("tfreward_shapes/256")
  assert spec.class_names == shapes.CLASS_NAMES and spec.num_classes == 6
  assert spec.num_classes_for("detection") == 6 and spec.num_classes_for("segmentation") == 7
  assert spec.segmentation_class_names[0] == "background" and spec.ignore_index == 255
  with pytest.raises(ValueError, match="classification"):
    spec.num_classes_for("classification")


def test_unknown_dataset_lists_the_known_ones():
  with pytest.raises(ValueError, match=r"unknown dataset 'mnist'; known datasets: .*coco/2017.*cityscapes"):
    pipeline.build_dataset(dataset="mnist", task="detection", split="train", training=True, image_size=(8, 8),
                           global_batch_size=2)
  with pytest.raises(ValueError, match="unknown dataset"):
    pipeline.dataset_spec("voc/2007")


@pytest.mark.parametrize("image_size", [(0, 8), (8,), (8.0, 8), (True, 8), 8, (8, 8, 8), (-4, 8)])
def test_bad_image_size(image_size):
  message = "image_size must be two positive integers.*" + re.escape(repr(image_size))
  with pytest.raises(ValueError, match=message):
    pipeline.build_dataset(dataset=NAME, task="detection", split="train", training=True, image_size=image_size,
                           global_batch_size=2)


@pytest.mark.parametrize("kwargs, message", [
    (dict(task="classification"), "task must be one of"),
    (dict(global_batch_size=0), "global_batch_size must be a positive integer, got 0"),
    (dict(max_instances=-1), "max_instances must be a positive integer, got -1"),
    (dict(max_examples=0), "max_examples must be None or a positive integer, got 0"),
    (dict(scale_range=(1.2, 0.8)), r"scale_range must be \(min, max\) with 0 < min <= max, got \(1.2, 0.8\)"),
    (dict(global_batch_size=3, input_context=tf.distribute.InputContext(1, 0, 2)),
     "global_batch_size 3 is not divisible by the 2 replicas"),
])
def test_bad_arguments(kwargs, message):
  args = dict(dataset=NAME, task="detection", split="train", training=True, image_size=(8, 8),
              global_batch_size=2)
  args.update(kwargs)
  with pytest.raises(ValueError, match=message):
    pipeline.build_dataset(**args)


def test_distributed_batch_not_divisible(data_dir, two_replica_strategy):
  with pytest.raises(ValueError, match="global_batch_size 5 is not divisible by the 2 replicas"):
    pipeline.distributed_dataset(two_replica_strategy, dataset=NAME, task="detection", split="train",
                                 training=True, image_size=SIZE, global_batch_size=5, data_dir=data_dir)
  with pytest.raises(ValueError, match="input_context"):
    pipeline.distributed_dataset(two_replica_strategy, dataset=NAME, input_context=None)


def _degenerate_example():
  """A decoded COCO-like example (60 x 80) with boxes: fine, zero height, inverted, NaN, a zero-area crowd, fine."""
  boxes = np.array([[0.1, 0.1, 0.5, 0.5], [0.2, 0.3, 0.2, 0.6], [0.6, 0.3, 0.2, 0.6], [np.nan, 0.1, 0.3, 0.3],
                    [0.4, 0.4, 0.4, 0.4], [0.5, 0.5, 0.9, 0.8]], np.float32)
  return {"image": tf.zeros([60, 80, 3], tf.uint8), "image_id": tf.constant(5, tf.int64), "boxes": tf.constant(boxes),
          "classes": tf.constant([0, 1, 2, 3, 4, 5], tf.int32),
          "crowd": tf.constant([False, False, False, False, True, False])}


def test_training_labels_drop_boxes_without_extent():
  for seed in range(4):
    _, labels = pipeline._train_element(_degenerate_example(), tf.constant([seed, 1], tf.int64), task="detection",
                                        image_size=(48, 64), max_instances=4, hflip=True, scale_range=(1.0, 1.0))
    # Only the two fine boxes survive (the zero-area crowd region is no training target either), packed first;
    # the rest is padding: zero boxes, class -1, valid False.
    np.testing.assert_array_equal(labels["classes"], [0, 5, -1, -1])
    np.testing.assert_array_equal(labels["valid"], [True, True, False, False])
    boxes = labels["boxes"].numpy()
    assert np.all(boxes[2:] == 0) and np.all(boxes[:2, 2:] > boxes[:2, :2])


def test_evaluation_labels_keep_source_boxes_for_coco_evaluation():
  # COCO's evaluation counts a non-crowd box of zero extent as an object (one no detection matches), and the
  # evaluator reads its ground truth from these labels: evaluation keeps it valid (the losses treat it as padding).
  example = _degenerate_example()
  example["boxes"] = tf.tensor_scatter_nd_update(example["boxes"], [[3]], [[0.1, 0.1, 0.3, 0.3]])  # (TFDS: no NaN)
  _, labels = pipeline._eval_element(example, task="detection", image_size=(48, 64), max_instances=8)
  np.testing.assert_array_equal(labels["classes"], [0, 1, 2, 3, 4, 5, -1, -1])
  np.testing.assert_array_equal(labels["valid"], [True, True, True, True, False, True, False, False])
  np.testing.assert_array_equal(labels["crowd"], [False] * 4 + [True] + [False] * 3)
  boxes = labels["boxes"].numpy()
  assert boxes[1, 2] == boxes[1, 0] and boxes[2, 2] < boxes[2, 0]
