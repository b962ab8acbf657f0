"""`tfreward predict` on image files with exported models of known outputs (tfreward.testing's bright-box models):
the drawn PNGs, detections.json in COCO results format, segmentation overlays, and the files the served model refuses
(unreadable, or too large by their header) skipped by name."""

import json

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from tfreward import cli
from tfreward.data import preview
from tfreward.export import saved_model
from tfreward.testing import BrightBoxDetector, BrightSegmenter


def _rectangle(hw, rect):
  image = np.full([*hw, 3], 40, np.uint8)
  y0, x0, y1, x1 = rect
  image[y0:y1, x0:x1] = 255
  return image


# Canvas 32 x 32: the rectangles sit on the resize grid (scales 1/4 and 1/3), so served boxes are exact.
IMAGE_A, RECT_A = _rectangle((64, 128), (8, 32, 24, 96)), (8, 32, 24, 96)
IMAGE_B, RECT_B = _rectangle((96, 48), (30, 12, 60, 36)), (30, 12, 60, 36)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("exports")
  saved_model.export_saved_model(BrightBoxDetector(), tmp / "detector", class_names=["canvas", "bright"],
                                 category_ids=[5, 9])
  saved_model.export_saved_model(BrightSegmenter(), tmp / "segmenter", class_names=["background", "bright"])
  return {"detector": str(tmp / "detector"), "segmenter": str(tmp / "segmenter")}


@pytest.fixture
def images(tmp_path, huge_png):
  folder = tmp_path / "in"
  folder.mkdir()
  (folder / "a.png").write_bytes(tf.io.encode_png(IMAGE_A).numpy())
  (folder / "b.jpg").write_bytes(tf.io.encode_jpeg(IMAGE_B, quality=100).numpy())
  png = tf.io.encode_png(IMAGE_B).numpy()
  (folder / "broken.png").write_bytes(png[: len(png) // 2])  # truncated
  (folder / "empty.jpg").write_bytes(b"")
  (folder / "notes.txt").write_text("not an image")
  (folder / "huge.png").write_bytes(huge_png)  # 20000 x 20000
  return folder


def _skipped(stderr):
  """{file name: reason} of the "skipped PATH: REASON" lines."""
  lines = [line[len("skipped "):].split(": ", 1) for line in stderr.splitlines() if line.startswith("skipped ")]
  return {path.rsplit("/", 1)[-1]: reason for path, reason in lines}


def _predict(capsys, export_dir, *inputs, out, threshold="0.3"):
  code = cli.main(["predict", "--saved-model", export_dir, *map(str, inputs), "--out", str(out),
                   "--score-threshold", threshold])
  captured = capsys.readouterr()
  return code, captured.out, captured.err


def test_detections_drawn_and_listed_in_coco_format(exports, images, tmp_path, capsys):
  out = tmp_path / "out"
  code, stdout, stderr = _predict(capsys, exports["detector"], images / "*.png", images / "b.jpg",
                                  images / "empty.jpg", images / "notes.txt", out=out)
  assert code == 0
  skipped = sorted(line.split(":")[0] for line in stderr.splitlines() if line.startswith("skipped "))
  assert skipped == [f"skipped {images / name}" for name in ("broken.png", "empty.jpg", "huge.png", "notes.txt")]
  reasons = _skipped(stderr)
  assert reasons["broken.png"].startswith("not a readable image (") and reasons["empty.jpg"] == "an empty file"
  assert reasons["notes.txt"] == "not a readable image (not JPEG, PNG, GIF, BMP or WebP)"
  assert reasons["huge.png"] == "too large to serve (20000 x 20000 px; the export decodes at most 8192 px a side)"
  assert "{{" not in stderr and "[Op:" not in stderr  # the cause, in one line
  assert "wrote 2 image(s)" in stdout and "ms per image" in stdout
  assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png", "detections.json"]
  detections = json.loads((out / "detections.json").read_text())
  # Threshold 0.3: the bright box (class 1, score 0.5) of each image; the whole-canvas box (0.25) is left out.
  assert [(d["file_name"], d["image_id"], d["category_id"], d["category_name"]) for d in detections] == [
      ("a.png", 1, 9, "bright"), ("b.jpg", 4, 9, "bright")]  # inputs a, broken, huge (.png), b.jpg
  for detection, (y0, x0, y1, x1) in zip(detections, (RECT_A, RECT_B)):
    np.testing.assert_allclose(detection["bbox"], [x0, y0, x1 - x0, y1 - y0], atol=0.01)
    assert detection["score"] == pytest.approx(0.5)
  drawn = np.asarray(Image.open(out / "a.png"))
  assert drawn.shape == IMAGE_A.shape
  assert tuple(drawn[RECT_A[2], (RECT_A[1] + RECT_A[3]) // 2]) == preview.class_colour(1)  # the frame's bottom edge
  # Threshold 0: the canvas box is drawn and listed too.
  code, _, _ = _predict(capsys, exports["detector"], images / "a.png", out=tmp_path / "all", threshold="0")
  assert code == 0
  listed = json.loads((tmp_path / "all" / "detections.json").read_text())
  assert [d["category_name"] for d in listed] == ["bright", "canvas"]


def test_segmentation_overlay_and_label_map(exports, images, tmp_path, capsys):
  out = tmp_path / "seg"
  code, _, stderr = _predict(capsys, exports["segmenter"], images / "a.png", images / "huge.png", images / "b.jpg",
                             images / "broken.png", out=out)
  assert code == 0
  assert sorted(_skipped(stderr)) == ["broken.png", "huge.png"]
  assert sorted(p.name for p in out.iterdir()) == ["a.labels.png", "a.png", "b.labels.png", "b.png"]
  labels = np.asarray(Image.open(out / "a.labels.png"))
  expected = np.zeros(IMAGE_A.shape[:2], np.uint8)
  y0, x0, y1, x1 = RECT_A
  expected[y0:y1, x0:x1] = 1
  np.testing.assert_array_equal(labels, expected)
  overlay = np.asarray(Image.open(out / "a.png")).astype(int)
  np.testing.assert_array_equal(overlay[0, 0], IMAGE_A[0, 0])  # background stays clear
  blended = (np.array([255, 255, 255]) + np.array(preview.class_colour(1))) / 2
  np.testing.assert_allclose(overlay[y0 + 1, x0 + 1], blended, atol=1)
  assert np.asarray(Image.open(out / "b.labels.png")).shape == IMAGE_B.shape[:2]


def test_errors_are_one_line(exports, images, tmp_path, capsys):
  for argv, message in (
      ((exports["detector"], images / "notes.txt"), "none of the 1 file(s) is a readable image"),
      ((exports["detector"], images / "*.gif"), "no file matches"),
      ((str(tmp_path / "nothing"), images / "a.png"), "no SavedModel in"),
  ):
    code, _, err = _predict(capsys, *argv, out=tmp_path / "x")
    assert code == 2 and err.strip().splitlines()[-1].startswith("tfreward: error:") and message in err, err
  code, _, err = _predict(capsys, exports["detector"], images / "a.png", out=tmp_path / "x", threshold="1.5")
  assert code == 2 and "--score-threshold must be in [0, 1]" in err


def test_an_export_without_valid_image_is_checked_before_serving(exports, images, tmp_path, capsys):
  """An export written before `valid_image` fails the whole call on a bad image: predict decodes each file first."""
  loaded = tf.saved_model.load(exports["detector"])
  serve = loaded.signatures["serve_encoded"]
  module = tf.Module()
  module.loaded = loaded
  module.serve = tf.function(lambda encoded: {k: v for k, v in serve(encoded_images=encoded).items()
                                              if k != "valid_image"},
                             input_signature=[tf.TensorSpec([None], tf.string, name="encoded_images")])
  old = str(tmp_path / "old")
  tf.saved_model.save(module, old, signatures={"serve_encoded": module.serve.get_concrete_function()})
  code, stdout, stderr = _predict(capsys, old, images / "a.png", images / "broken.png", out=tmp_path / "out")
  assert code == 0 and "wrote 1 image(s)" in stdout
  assert list(_skipped(stderr)) == ["broken.png"]
