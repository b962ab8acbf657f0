"""Tests for tfreward.training.metrics.StreamingMeanIoU and eval_callback.SegmentationEvalCallback."""

import pathlib

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfreward.training import eval_callback
from tfreward.training import metrics
from tfreward.testing import BrightSegmenter

GOLDEN = pathlib.Path(__file__).resolve().parents[1] / "data" / "streaming_miou" / "cases.npz"


def numpy_counts(y_true, y_pred, num_classes, weight=None, ignore_index=255):
  """[C, C] confusion (rows truth) and [C] misses (predictions outside [0, C)) by explicit loops."""
  y_true = np.asarray(y_true).reshape(-1)
  y_pred = np.asarray(y_pred).reshape(-1)
  weight = np.ones(y_true.shape, np.float64) if weight is None else np.asarray(weight, np.float64).reshape(-1)
  confusion = np.zeros([num_classes, num_classes])
  missed = np.zeros([num_classes])
  for t, p, w in zip(y_true, y_pred, weight):
    if t == ignore_index or not 0 <= t < num_classes:
      continue
    if 0 <= p < num_classes:
      confusion[t, p] += w
    else:
      missed[t] += w
  return confusion, missed


def numpy_miou(confusion, missed):
  tp = np.diag(confusion)
  union = confusion.sum(1) + missed + confusion.sum(0) - tp
  present = union > 0
  iou = np.where(present, tp / np.maximum(union, 1e-12), 0.0)
  miou = iou[present].mean() if present.any() else 0.0
  return miou, iou


def random_maps(rng, shape, num_classes, ignore_fraction=0.2):
  y_true = rng.integers(0, num_classes, shape).astype(np.int32)
  y_true[rng.random(shape) < ignore_fraction] = 255
  y_pred = np.where(rng.random(shape) < 0.6, np.where(y_true == 255, 0, y_true),
                    rng.integers(0, num_classes, shape)).astype(np.int32)
  return y_true, y_pred


def test_matches_numpy_over_several_batches():
  rng = np.random.default_rng(0)
  metric = metrics.StreamingMeanIoU(5)
  confusion, missed = np.zeros([5, 5]), np.zeros([5])
  for _ in range(3):
    y_true, y_pred = random_maps(rng, [2, 6, 7], 5)
    metric.update_state(y_true, y_pred)
    c, m = numpy_counts(y_true, y_pred, 5)
    confusion += c
    missed += m
  miou, iou = numpy_miou(confusion, missed)
  np.testing.assert_array_equal(metric.confusion_matrix().numpy(), confusion)
  np.testing.assert_allclose(metric.result().numpy(), miou, atol=1e-6)
  np.testing.assert_allclose(metric.per_class_iou().numpy(), iou, atol=1e-6)
  assert metric.result().dtype == tf.float32


def test_ignored_pixels_do_not_count_whatever_the_prediction():
  y_true = np.array([[[0, 1], [255, 255]]], np.int32)
  good = np.array([[[0, 1], [0, 1]]], np.int32)
  bad = np.array([[[0, 1], [1, 0]]], np.int32)
  for y_pred in (good, bad):
    metric = metrics.StreamingMeanIoU(2)
    metric.update_state(y_true, y_pred)
    assert metric.result().numpy() == pytest.approx(1.0)
  # Any other label outside [0, C) is dropped too.
  metric = metrics.StreamingMeanIoU(2)
  metric.update_state(np.array([[0, 7, -3]]), np.array([[0, 1, 1]]))
  np.testing.assert_array_equal(metric.class_present().numpy(), [True, False])
  assert metric.result().numpy() == pytest.approx(1.0)


def test_class_absent_from_both_maps_is_excluded_and_one_sided_class_counts_zero():
  y_true = np.array([[0, 0, 1, 1]], np.int32)
  y_pred = np.array([[0, 0, 1, 3]], np.int32)  # class 2 absent; class 3 only predicted
  metric = metrics.StreamingMeanIoU(4)
  metric.update_state(y_true, y_pred)
  np.testing.assert_allclose(metric.per_class_iou().numpy(), [1.0, 0.5, 0.0, 0.0])
  np.testing.assert_array_equal(metric.class_present().numpy(), [True, True, False, True])
  assert metric.result().numpy() == pytest.approx((1.0 + 0.5 + 0.0) / 3)


def test_out_of_range_prediction_is_a_miss():
  metric = metrics.StreamingMeanIoU(2)
  metric.update_state(np.array([[0, 0, 1]]), np.array([[0, 9, 1]]))
  np.testing.assert_allclose(metric.per_class_iou().numpy(), [0.5, 1.0])


def test_empty_and_all_ignored_give_zero_not_nan():
  metric = metrics.StreamingMeanIoU(3)
  assert metric.result().numpy() == 0.0
  metric.update_state(np.full([2, 4, 4], 255, np.int32), np.zeros([2, 4, 4], np.int32))
  assert metric.result().numpy() == 0.0
  assert not np.isnan(metric.per_class_iou().numpy()).any()
  metric.update_state(np.zeros([0, 4, 4], np.int32), np.zeros([0, 4, 4], np.int32))
  assert metric.result().numpy() == 0.0


def test_sample_weight_per_example_and_per_pixel():
  rng = np.random.default_rng(1)
  y_true, y_pred = random_maps(rng, [3, 5, 4], 4)
  metric = metrics.StreamingMeanIoU(4)
  metric.update_state(y_true, y_pred, sample_weight=np.array([1.0, 0.0, 1.0]))
  only = metrics.StreamingMeanIoU(4)
  only.update_state(y_true[[0, 2]], y_pred[[0, 2]])
  np.testing.assert_array_equal(metric.counts.numpy(), only.counts.numpy())
  pixel_weight = rng.random([3, 5, 4]).astype(np.float32)
  weighted = metrics.StreamingMeanIoU(4)
  weighted.update_state(y_true, y_pred, sample_weight=pixel_weight)
  confusion, missed = numpy_counts(y_true, y_pred, 4, pixel_weight)
  np.testing.assert_allclose(weighted.confusion_matrix().numpy(), confusion, rtol=1e-5)
  np.testing.assert_allclose(weighted.result().numpy(), numpy_miou(confusion, missed)[0], atol=1e-6)


@pytest.mark.parametrize("accumulator_dtype", ["float32", "float64", "int64"])
def test_xla_update_equals_eager(accumulator_dtype):
  rng = np.random.default_rng(2)
  eager = metrics.StreamingMeanIoU(6, accumulator_dtype=accumulator_dtype)
  compiled = metrics.StreamingMeanIoU(6, accumulator_dtype=accumulator_dtype)
  update = tf.function(compiled.update_state, jit_compile=True)
  confusion, missed = np.zeros([6, 6]), np.zeros([6])
  weight = np.array([1.0, 2.0], np.float32)
  for _ in range(2):
    y_true, y_pred = random_maps(rng, [2, 8, 9], 6)
    eager.update_state(y_true, y_pred, sample_weight=weight)
    update(tf.constant(y_true), tf.constant(y_pred), tf.constant(weight))
    c, m = numpy_counts(y_true, y_pred, 6, np.broadcast_to(weight[:, None, None], y_true.shape))
    confusion += c
    missed += m
  assert compiled.counts.dtype == accumulator_dtype
  np.testing.assert_array_equal(compiled.counts.numpy(), eager.counts.numpy())
  np.testing.assert_array_equal(eager.confusion_matrix().numpy(), confusion)
  result = tf.function(compiled.result, jit_compile=True)()
  np.testing.assert_allclose(result.numpy(), eager.result().numpy(), atol=1e-7)
  np.testing.assert_allclose(eager.result().numpy(), numpy_miou(confusion, missed)[0], atol=1e-6)


def test_golden_label_maps_streamed_as_one_batch_and_per_image():
  data = np.load(GOLDEN)
  for i in range(int(data["num_cases"])):
    gt, pred = data[f"case{i}_gt"], data[f"case{i}_pred"]
    num_classes = int(data[f"case{i}_num_classes"])
    intersect = data[f"case{i}_area_intersect"].sum(0).astype(np.float64)
    union = data[f"case{i}_area_union"].sum(0).astype(np.float64)
    present = union > 0
    expected_iou = np.where(present, intersect / np.maximum(union, 1), 0.0)
    batched = metrics.StreamingMeanIoU(num_classes, ignore_index=int(data[f"case{i}_ignore_index"]))
    batched.update_state(gt, pred)
    per_image = metrics.StreamingMeanIoU(num_classes)
    for b in range(gt.shape[0]):
      per_image.update_state(gt[b:b + 1], pred[b:b + 1])
    for metric in (batched, per_image):
      np.testing.assert_allclose(metric.per_class_iou().numpy(), expected_iou, atol=1e-6)
      np.testing.assert_array_equal(metric.class_present().numpy(), present)
      np.testing.assert_allclose(metric.result().numpy(), expected_iou[present].mean(), atol=1e-6)


def test_two_replicas_sum_their_counts(two_replica_strategy):
  rng = np.random.default_rng(3)
  y_true, y_pred = random_maps(rng, [4, 5, 5], 3)
  with two_replica_strategy.scope():
    metric = metrics.StreamingMeanIoU(3)
  dataset = tf.data.Dataset.from_tensor_slices((y_true, y_pred)).batch(4)
  batch = next(iter(two_replica_strategy.experimental_distribute_dataset(dataset)))

  @tf.function
  def step(batch):
    two_replica_strategy.run(lambda t, p: metric.update_state(t, p), args=batch)

  step(batch)
  confusion, missed = numpy_counts(y_true, y_pred, 3)
  np.testing.assert_array_equal(metric.confusion_matrix().numpy(), confusion)
  np.testing.assert_allclose(metric.result().numpy(), numpy_miou(confusion, missed)[0], atol=1e-6)


def test_reset_and_config():
  metric = metrics.StreamingMeanIoU(3, ignore_index=-1, accumulator_dtype="float64", name="miou")
  metric.update_state(np.array([[0, 1]]), np.array([[0, 1]]))
  metric.reset_state()
  assert metric.counts.numpy().sum() == 0
  clone = metrics.StreamingMeanIoU.from_config(metric.get_config())
  assert (clone.num_classes, clone.ignore_index, clone.accumulator_dtype, clone.name) == (3, -1, "float64", "miou")


@pytest.mark.parametrize("kwargs, match", [
    ({"num_classes": 0}, "num_classes"),
    ({"num_classes": 2.0}, "num_classes"),
    ({"num_classes": 4, "ignore_index": 3}, "ignore_index"),
    ({"num_classes": 4, "accumulator_dtype": "int32"}, "accumulator_dtype"),
])
def test_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    metrics.StreamingMeanIoU(**kwargs)


def test_shape_mismatch_raises():
  metric = metrics.StreamingMeanIoU(2)
  with pytest.raises(ValueError, match="same shape"):
    metric.update_state(np.zeros([1, 2, 2], np.int32), np.zeros([1, 2, 3], np.int32))


# --- SegmentationEvalCallback ------------------------------------------------------------------------------------


def segmentation_dataset(rng, num_examples=5, batch_size=2, size=(8, 8)):
  images = rng.integers(0, 256, [num_examples, *size, 3]).astype(np.uint8)
  mask = rng.integers(0, 2, [num_examples, *size]).astype(np.int32)
  mask[:, -2:, :] = 255  # padded canvas rows
  pad = (-num_examples) % batch_size  # pad the last batch as the pipeline does, with example_valid False
  images = np.concatenate([images, np.full([pad, *size, 3], 255, np.uint8)])
  mask = np.concatenate([mask, np.zeros([pad, *size], np.int32)])
  labels = {"mask": mask, "example_valid": np.arange(num_examples + pad) < num_examples}
  dataset = tf.data.Dataset.from_tensor_slices((images, labels)).batch(batch_size)
  return dataset, images[:num_examples], mask[:num_examples]


@pytest.mark.parametrize("jit_compile", [True, False])
def test_segmentation_callback_evaluate_matches_numpy(jit_compile):
  rng = np.random.default_rng(4)
  dataset, images, mask = segmentation_dataset(rng)
  model = BrightSegmenter(image_size=(8, 8))
  callback = eval_callback.SegmentationEvalCallback(dataset, num_classes=2, jit_compile=jit_compile, verbose=0)
  results = callback.evaluate(model)
  predicted = (images.astype(np.float32).mean(-1) > 127.5).astype(np.int32)
  expected = numpy_miou(*numpy_counts(mask, predicted, 2))[0]
  assert set(results) == {"mIoU"}
  assert results["mIoU"] == pytest.approx(expected, abs=1e-6)
  assert callback.evaluate(model)["mIoU"] == pytest.approx(expected, abs=1e-6)  # reset between evaluations


def test_segmentation_callback_logs_every_n_epochs(capsys):
  rng = np.random.default_rng(5)
  dataset, _, _ = segmentation_dataset(rng)
  model = BrightSegmenter(image_size=(8, 8))
  model.compile(optimizer="sgd")
  callback = eval_callback.SegmentationEvalCallback(dataset, num_classes=2, every_n_epochs=2, prefix="eval_")
  history = model.fit(dataset, epochs=4, callbacks=[callback], verbose=0, shuffle=False)
  assert len(history.history["eval_mIoU"]) == 2
  expected = callback.evaluate(model)["mIoU"]
  np.testing.assert_allclose(history.history["eval_mIoU"], [expected, expected])
  assert "batch" in capsys.readouterr().out  # the progress bar of the evaluation


def test_segmentation_callback_bad_arguments():
  dataset = tf.data.Dataset.range(3)
  with pytest.raises(ValueError, match="num_classes"):
    eval_callback.SegmentationEvalCallback(dataset, num_classes=0)
  with pytest.raises(ValueError, match="every_n_epochs"):
    eval_callback.SegmentationEvalCallback(dataset, num_classes=2, every_n_epochs=0)
  with pytest.raises(ValueError, match="finite"):
    eval_callback.SegmentationEvalCallback(dataset.repeat(), num_classes=2)
  callback = eval_callback.SegmentationEvalCallback(dataset, num_classes=2, verbose=0)
  with pytest.raises(ValueError, match="segment"):
    callback.evaluate(keras.Sequential([keras.layers.Dense(1)]))


def test_segmentation_callback_under_two_replica_fit(two_replica_strategy):
  rng = np.random.default_rng(6)
  dataset, images, mask = segmentation_dataset(rng, num_examples=4)
  # Keras' symbolic build under MirroredStrategy MEAN-reduces a training batch, which fails on bool tensors, so the
  # training data here carries no `example_valid`; the evaluation dataset is never distributed.
  train = tf.data.Dataset.from_tensor_slices((images, mask)).batch(2)
  with two_replica_strategy.scope():
    model = BrightSegmenter(image_size=(8, 8))
    model.compile(optimizer="sgd", jit_compile=False)
  callback = eval_callback.SegmentationEvalCallback(dataset, num_classes=2, verbose=0)
  history = model.fit(train, epochs=1, callbacks=[callback], verbose=0, shuffle=False)
  predicted = (images.astype(np.float32).mean(-1) > 127.5).astype(np.int32)
  expected = numpy_miou(*numpy_counts(mask, predicted, 2))[0]
  np.testing.assert_allclose(history.history["val_mIoU"], [expected], atol=1e-6)
