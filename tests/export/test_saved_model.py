"""Tests for tfreward.export.saved_model: export tiny models, then serve them from a fresh TensorFlow-only process,
with good and bad images (empty, garbage, truncated, a PNG bomb) in one batch."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfreward.errors import UserError
from tfreward.export import saved_model
from tfreward.export.served import ServedDetector, ServedSegmenter
from tfreward.testing import BrightBoxDetector, BrightSegmenter

# Runs in a fresh interpreter where keras, tf_keras and tfreward cannot be imported (TensorFlow only); prints the
# outputs of every signature as JSON.
SERVE_SCRIPT = r"""
import json, resource, sys
for blocked in ("keras", "tf_keras", "tfreward"):
  sys.modules[blocked] = None  # any import of them now fails
import tensorflow as tf

spec = json.loads(sys.argv[1])
read = lambda paths: tf.stack([tf.io.read_file(p) for p in paths])
encoded = read(spec["encoded"])
images = tf.stack([tf.io.decode_png(tf.io.read_file(p), channels=3) for p in spec["images"]])
results = {}
for name, export_dir in spec["exports"].items():
  loaded = tf.saved_model.load(export_dir)

  def run(signature, **inputs):
    return {k: v.numpy().tolist() for k, v in loaded.signatures[signature](**inputs).items()}

  result = {
      "signatures": sorted(loaded.signatures.keys()),
      "serving_default": run("serving_default", encoded_images=encoded),
      "serve_encoded": run("serve_encoded", encoded_images=encoded),
      "serve_images": run("serve_images", images=images),
      "empty": run("serve_encoded", encoded_images=tf.zeros([0], tf.string)),
      "too_big": run("serve_encoded", encoded_images=read([spec["too_big"]]))["valid_image"],
      "alone": [run("serve_encoded", encoded_images=read([p])) for p in spec["alone"]],
  }
  # The mixed batch holds a PNG that decodes to 1.2 GB: the peak memory must not grow by anything like that.
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  result["mixed"] = run("serve_encoded", encoded_images=read(spec["mixed"]))
  result["mixed_peak_growth_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak) / 1024
  results[name] = result
print(json.dumps(results))
"""


def rectangle_image(hw, rect):
  image = np.zeros([*hw, 3], np.uint8)
  y0, x0, y1, x1 = rect
  image[y0:y1, x0:x1] = 255
  return image


# Canvas 32x32. A: 64x128 landscape (scale 1/4), B: 96x48 portrait (scale 1/3), C: 64x128. The rectangles sit on the
# resize grid, so the boxes mapped back to original pixels are exact.
RECT_A, RECT_B, RECT_C = (8, 32, 24, 96), (30, 12, 60, 36), (16, 0, 48, 64)
IMAGE_A = rectangle_image((64, 128), RECT_A)
IMAGE_B = rectangle_image((96, 48), RECT_B)
IMAGE_C = rectangle_image((64, 128), RECT_C)


# The mixed batch: a good JPEG, five images that must be refused, a good PNG.
MIXED = ("b.jpg", "empty.jpg", "garbage.png", "truncated.png", "truncated.jpg", "huge.png", "a.png")
MIXED_VALID = [True, False, False, False, False, False, True]


def write_inputs(tmp_path, huge_png):
  files = {"a.png": tf.io.encode_png(IMAGE_A), "b.jpg": tf.io.encode_jpeg(IMAGE_B, quality=100),
           "c.png": tf.io.encode_png(IMAGE_C), "big.png": tf.io.encode_png(np.zeros([64, 256, 3], np.uint8))}
  files = {name: data.numpy() for name, data in files.items()}
  files.update({"empty.jpg": b"", "garbage.png": b"\x89PNG garbage, not an image", "huge.png": huge_png,
                # TF refuses a truncated JPEG (jpeg::Uncompress fails on its premature end), even one missing only EOI.
                "truncated.png": files["a.png"][:len(files["a.png"]) // 2], "truncated.jpg": files["b.jpg"][:-2]})
  for name, data in files.items():
    (tmp_path / name).write_bytes(data)
  return {"encoded": [str(tmp_path / "a.png"), str(tmp_path / "b.jpg")],
          "images": [str(tmp_path / "a.png"), str(tmp_path / "c.png")], "too_big": str(tmp_path / "big.png"),
          "mixed": [str(tmp_path / name) for name in MIXED],
          "alone": [str(tmp_path / "b.jpg"), str(tmp_path / "a.png")]}


@pytest.fixture(scope="module")
def served(tmp_path_factory, huge_png):
  """Exports a detector and a segmenter, then serves both from one fresh TensorFlow-only process."""
  tmp_path = tmp_path_factory.mktemp("export")
  detector = BrightBoxDetector()
  detector.score_offset.assign(0.125)  # the exported scores must show the trained value
  saved_model.export_saved_model(detector, tmp_path / "detector", max_decoded_side=200)
  saved_model.export_saved_model(BrightSegmenter(), tmp_path / "segmenter", max_decoded_side=200)
  spec = write_inputs(tmp_path, huge_png)
  spec["exports"] = {"detector": str(tmp_path / "detector"), "segmenter": str(tmp_path / "segmenter")}
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
  proc = subprocess.run([sys.executable, "-c", SERVE_SCRIPT, json.dumps(spec)],
                        capture_output=True, text=True, env=env, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return dict(json.loads(proc.stdout.strip().splitlines()[-1]), exports=spec["exports"], detector_model=detector)


def test_detection_export_serves_original_pixels(served):
  out = served["detector"]
  assert out["signatures"] == ["serve_encoded", "serve_images", "serving_default"]
  assert out["too_big"] == [False]  # 64 x 256 > max_decoded_side=200
  expected = {
      "serve_encoded": ([64, 128], [96, 48], RECT_A, RECT_B),
      "serve_images": ([64, 128], [64, 128], RECT_A, RECT_C),
  }
  for signature in ("serving_default", "serve_encoded", "serve_images"):
    hw_0, hw_1, rect_0, rect_1 = expected["serve_encoded" if signature == "serving_default" else signature]
    result = out[signature]
    assert result["image_hw"] == [hw_0, hw_1]
    assert result["valid_image"] == [True, True]
    assert result["num_detections"] == [2, 2]
    np.testing.assert_allclose(result["scores"], [[0.625, 0.375, 0.0]] * 2)
    assert result["classes"] == [[1, 0, -1]] * 2
    boxes = np.array(result["boxes"])  # [2, 3, 4] yxyx pixels
    assert boxes.shape == (2, 3, 4)
    # Detection 0: the rectangle in original pixels. Detection 1: the whole canvas, clipped to the image.
    np.testing.assert_allclose(boxes[:, 0], [rect_0, rect_1], atol=1e-3)
    np.testing.assert_allclose(boxes[:, 1], [[0, 0, *hw_0], [0, 0, *hw_1]], atol=1e-3)
    np.testing.assert_array_equal(boxes[:, 2], 0.0)  # padding
  empty = out["empty"]
  assert np.array(empty["boxes"]).size == 0 and empty["num_detections"] == [] and empty["image_hw"] == []
  assert empty["valid_image"] == []


def test_detection_bad_images_refused_one_by_one(served):
  out = served["detector"]
  mixed, (jpeg, png) = out["mixed"], out["alone"]
  assert mixed["valid_image"] == MIXED_VALID
  for row, alone in ((0, jpeg), (6, png)):  # the good images: as served alone
    assert alone["valid_image"] == [True]
    for key in ("boxes", "scores", "classes", "num_detections", "image_hw"):
      np.testing.assert_array_equal(mixed[key][row], alone[key][0], err_msg=key)
  for row in range(1, 6):  # no detections
    assert mixed["num_detections"][row] == 0 and mixed["image_hw"][row] == [0, 0]
    assert mixed["classes"][row] == [-1] * 3 and mixed["scores"][row] == [0.0] * 3
    np.testing.assert_array_equal(mixed["boxes"][row], 0.0)
  assert out["mixed_peak_growth_mb"] < 300, out  # the PNG bomb (1.2 GB decoded) was never decoded


def test_segmentation_export_serves_original_size_labels(served):
  out = served["segmenter"]
  assert out["signatures"] == ["serve_encoded", "serve_images", "serving_default"]
  assert out["too_big"] == [False]
  masks = {name: (image[..., 0] > 127).astype(np.int32) for name, image in
           (("a", IMAGE_A), ("b", IMAGE_B), ("c", IMAGE_C))}
  for signature in ("serving_default", "serve_encoded"):
    labels = np.array(out[signature]["labels"])
    assert out[signature]["image_hw"] == [[64, 128], [96, 48]]
    assert labels.shape == (2, 96, 128)  # varied sizes: padded with -1 to the largest height and width
    np.testing.assert_array_equal(labels[0, :64, :128], masks["a"])
    np.testing.assert_array_equal(labels[0, 64:], -1)
    np.testing.assert_array_equal(labels[1, :96, :48], masks["b"])
    np.testing.assert_array_equal(labels[1, :, 48:], -1)
  labels = np.array(out["serve_images"]["labels"])
  assert labels.shape == (2, 64, 128)
  np.testing.assert_array_equal(labels, np.stack([masks["a"], masks["c"]]))
  assert out["serve_images"]["valid_image"] == [True, True]
  assert np.array(out["empty"]["labels"]).size == 0


def test_segmentation_bad_images_refused_one_by_one(served):
  out = served["segmenter"]
  mixed, (jpeg, png) = out["mixed"], out["alone"]
  assert mixed["valid_image"] == MIXED_VALID
  labels = np.array(mixed["labels"])
  assert labels.shape == (7, 96, 128)  # padded to the valid images' largest height and width
  for row, alone in ((0, jpeg), (6, png)):
    (height, width), = alone["image_hw"]
    assert mixed["image_hw"][row] == [height, width]
    np.testing.assert_array_equal(labels[row, :height, :width], np.array(alone["labels"])[0])
  for row in range(1, 6):
    assert mixed["image_hw"][row] == [0, 0]
    np.testing.assert_array_equal(labels[row], -1)
  assert out["mixed_peak_growth_mb"] < 300, out


def test_labels_to_original_nearest_neighbour_on_an_inexact_scale():
  # 5x7 image on a 4x4 canvas: scale 4/7, resized 3x4 (rounded). Every original pixel takes the canvas label under
  # its centre, and the canvas padding is never sampled.
  canvas = tf.constant(np.arange(16, dtype=np.int32).reshape(1, 4, 4))
  scale = tf.constant([4.0 / 7.0])
  out = saved_model._labels_to_original(canvas, scale, tf.constant([[5, 7]]), (4, 4)).numpy()[0]
  rows = np.minimum(np.floor((np.arange(5) + 0.5) * 3 / 5), 2).astype(int)
  cols = np.minimum(np.floor((np.arange(7) + 0.5) * 4 / 7), 3).astype(int)
  np.testing.assert_array_equal(out, canvas.numpy()[0][rows][:, cols])
  assert out.max() < 12  # row 3 of the canvas is padding


def test_bad_arguments(tmp_path):
  with pytest.raises(ValueError, match="exactly one of detect"):
    saved_model.export_saved_model(keras.Sequential([keras.layers.Dense(1)]), tmp_path / "x")
  with pytest.raises(ValueError, match="task"):
    saved_model.export_saved_model(BrightBoxDetector(), tmp_path / "x", task="panoptic")
  with pytest.raises(ValueError, match="max_decoded_side"):
    saved_model.export_saved_model(BrightBoxDetector(), tmp_path / "x", max_decoded_side=0)
  model = BrightBoxDetector()
  model.image_size = (32, 0)
  with pytest.raises(ValueError, match="image_size"):
    saved_model.export_saved_model(model, tmp_path / "x")
  assert not (tmp_path / "x").exists()


def test_non_finite_weights_refused_before_writing(tmp_path):
  model = BrightSegmenter()
  model.threshold.assign(float("nan"))
  message = r"refusing to export: 1 of the model's 1 weights hold NaN or Inf \(first: \S*threshold\)"
  with pytest.raises(UserError, match=message) as err:
    saved_model.export_saved_model(model, tmp_path / "x")
  assert "diverged" in str(err.value) and "earlier checkpoint" in str(err.value) and "\n" not in str(err.value)
  assert not (tmp_path / "x").exists()


def test_max_decoded_side_moves_the_bound(tmp_path):
  encoded = tf.constant([tf.io.encode_png(IMAGE_A).numpy()])  # 64 x 128
  for side, valid in ((127, False), (128, True)):
    module = saved_model.export_saved_model(BrightBoxDetector(), tmp_path / str(side), max_decoded_side=side)
    assert module.serve_encoded(encoded)["valid_image"].numpy().tolist() == [valid]
    assert tf.saved_model.load(str(tmp_path / str(side))).max_decoded_side.numpy() == side


def test_served_detector_equals_the_model_on_canvases(served, tmp_path):
  images = np.zeros([2, 32, 32, 3], np.uint8)
  images[0, 4:10, 20:30] = 255
  images[1, 15:31, 2:9] = 255
  wrapped = ServedDetector(served["exports"]["detector"], (32, 32))
  direct, through_serving = served["detector_model"].detect(images), wrapped.detect(tf.constant(images))
  keep = np.arange(3)[None] < direct["num_detections"].numpy()[:, None]
  for key in ("boxes", "scores", "classes"):
    np.testing.assert_allclose(np.asarray(through_serving[key])[keep], np.asarray(direct[key])[keep], atol=1e-6)
  np.testing.assert_array_equal(through_serving["num_detections"], direct["num_detections"])
  with pytest.raises(UserError, match="not a detection model"):
    ServedDetector(served["exports"]["segmenter"], (32, 32))
  with pytest.raises(UserError, match="no SavedModel"):
    ServedDetector(str(tmp_path / "missing"), (32, 32))


def test_served_segmenter_equals_the_model_on_canvases(served):
  images = np.zeros([2, 32, 32, 3], np.uint8)
  images[0, 4:10, 20:30] = 255
  images[1, 15:31, 2:9] = 255
  wrapped = ServedSegmenter(served["exports"]["segmenter"], (32, 32))
  labels = wrapped.segment(tf.constant(images))["labels"]
  assert labels.dtype == tf.int32
  np.testing.assert_array_equal(labels, (images[..., 0] > 127).astype(np.int32))
  with pytest.raises(UserError, match="not a segmentation model"):
    ServedSegmenter(served["exports"]["detector"], (32, 32))
