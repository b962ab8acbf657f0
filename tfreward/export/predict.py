"""`tfreward predict`: an exported SavedModel as served (its `serve_encoded` signature) on a user's image files.

Per readable image, OUT_DIR gets `<name>.png`: the image with each detection at or above the score threshold framed
in its class colour and labelled "class score" (detection), or the label map blended over the image (segmentation;
a "background" class stays clear); segmentation also writes `<name>.labels.png`, the label ids as 8-bit grey.
Detection writes `detections.json`, in COCO results format plus names: one entry per detection with `file_name`,
`image_id` (the file's position in the input order, from 1), `category_id`, `category_name`, `bbox` [x, y, w, h] in
the original image's pixels and `score`. The served model checks each file (`valid_image`); a file it refuses (not an
image, corrupt or truncated, or larger than the export's `max_decoded_side`) is reported by name with the reason,
read from its header without decoding a large image, and skipped; the others still run.
"""

import dataclasses
import glob
import json
import os
import re
import time

import keras
import numpy as np
import tensorflow as tf
from PIL import Image, ImageDraw

from tfreward.data import preview
from tfreward.errors import UserError
from tfreward.export import decode


@dataclasses.dataclass
class PredictReport:
  written: list  # PNG paths, one per image that ran
  skipped: list  # (path, reason) of the files that did not
  detections_json: str = ""  # path of detections.json (detection models)
  seconds_per_image: float = 0.0  # median serving time per image, decoding included


def expand_inputs(patterns):
  """Files named by `patterns` (paths or globs), in the given order, each once; a pattern that matches nothing is an
  error."""
  files = []
  for pattern in patterns:
    matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
    matches = [m for m in matches if os.path.isfile(m)]
    if not matches:
      raise UserError(f"no file matches {pattern!r}.")
    files += [m for m in matches if m not in files]
  return files


def _load(export_dir):
  if not os.path.isdir(export_dir) or not tf.saved_model.contains_saved_model(export_dir):
    raise UserError(f"no SavedModel in {export_dir!r}; run `tfreward export --model-dir ...` first.")
  loaded = tf.saved_model.load(export_dir)
  if "serve_encoded" not in loaded.signatures:
    raise UserError(f"the SavedModel in {export_dir!r} has no `serve_encoded` signature; export it with tfreward.")
  return loaded


def _cause(error):
  """"{{function_node ...}} Invalid PNG. Failed to initialize decoder. [Op:DecodeImage]" -> the middle part."""
  first = error.message.splitlines()[0] if error.message else ""
  return re.sub(r"\{\{.*?\}\}|\[Op:\w+\]", "", first).strip() or type(error).__name__


def _decodable(data):
  """The decoded RGB image [H, W, 3] uint8, or the reason it is not one."""
  try:
    image = tf.io.decode_image(data, channels=3, expand_animations=False).numpy()
  except (tf.errors.InvalidArgumentError, tf.errors.UnknownError) as e:
    return None, f"not a readable image ({_cause(e)})"
  if image.shape[0] == 0 or image.shape[1] == 0:
    return None, "an empty image"
  return image, None


_header_size = tf.function(decode.header_size, input_signature=[tf.TensorSpec([], tf.string)])


def _refusal(data, max_side):
  """Why the served model (exported with `max_decoded_side` = max_side, if known) refused `data`, in one line; decodes
  only an image its header shows within the bound."""
  if not data:
    return "an empty file"
  try:
    fmt, (height, width), pixels = (t.numpy() for t in _header_size(tf.constant(data)))
  except tf.errors.InvalidArgumentError as e:
    return f"not a readable image ({_cause(e)})"
  if fmt == decode.UNKNOWN:
    return f"not a readable image (not {', '.join(decode.FORMATS[:-1])} or {decode.FORMATS[-1]})"
  if max_side is not None and (max(height, width) > max_side or pixels > max_side ** 2):
    frames = f", {pixels} pixels in all frames" if pixels > height * width else ""
    return f"too large to serve ({height} x {width} px{frames}; the export decodes at most {max_side} px a side)"
  return _decodable(data)[1] or "refused by the served model"


def _class_name(class_names, label):
  return class_names[label] if label < len(class_names) else f"class {label}"


def draw_detections(image, boxes_yxyx, classes, scores, class_names):
  """The image [H, W, 3] uint8 with each box (yxyx pixels) framed in its class colour and labelled; a PIL image."""
  canvas = Image.fromarray(image)
  draw = ImageDraw.Draw(canvas)
  font = preview.default_font(max(10, min(image.shape[:2]) // 30))
  width = max(2, min(image.shape[:2]) // 200)
  for (y0, x0, y1, x1), label, score in zip(boxes_yxyx, classes, scores):
    colour = preview.class_colour(label)
    draw.rectangle([x0, y0, x1, y1], outline=colour, width=width)
    text = f"{_class_name(class_names, label)} {score:.2f}"
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    tw, th = right - left + 4, bottom - top + 2
    tx = min(max(x0, 0), max(canvas.width - tw, 0))
    ty = y0 - th if y0 - th >= 0 else y0
    draw.rectangle([tx, ty, tx + tw, ty + th], fill=colour)
    draw.text((tx + 2 - left, ty + 1 - top), text, fill=preview.text_colour(colour), font=font)
  return canvas


def blend_labels(image, labels, class_names, alpha=0.5):
  """The image [H, W, 3] uint8 with the label map [H, W] blended in class colours (not "background"); PIL."""
  lut = np.array([preview.class_colour(k) for k in range(256)], np.float32)
  colours = lut[np.clip(labels, 0, 255)]
  blend = (labels >= 0)
  if class_names and class_names[0] == "background":
    blend &= labels != 0
  mixed = np.where(blend[..., None], (1 - alpha) * image + alpha * colours, image)
  return Image.fromarray(mixed.round().astype(np.uint8))


def _names(loaded):
  if hasattr(loaded, "class_names"):
    return ([n.decode() for n in loaded.class_names.numpy()], [int(i) for i in loaded.category_ids.numpy()])
  return [], []


def predict_files(export_dir, patterns, out_dir, *, score_threshold=0.3, progress=True):
  """Runs the SavedModel in `export_dir` on the files of `patterns`; writes into `out_dir` (see the module
  docstring), with a progress bar over the files unless `progress` is False. Returns a PredictReport."""
  if not 0.0 <= float(score_threshold) <= 1.0:
    raise UserError(f"--score-threshold must be in [0, 1], got {score_threshold!r}.")
  files = expand_inputs(patterns)
  loaded = _load(export_dir)
  serve = loaded.signatures["serve_encoded"]
  detection = "boxes" in serve.structured_outputs
  checks = "valid_image" in serve.structured_outputs  # an older export fails the whole call on a bad image instead
  max_side = int(loaded.max_decoded_side.numpy()) if hasattr(loaded, "max_decoded_side") else None
  class_names, category_ids = _names(loaded)
  os.makedirs(out_dir, exist_ok=True)
  report, results, times, stems = PredictReport(written=[], skipped=[]), [], [], set()
  bar = keras.utils.Progbar(len(files), unit_name="image") if progress and len(files) > 1 else None
  for index, path in enumerate(files, start=1):
    if bar is not None:
      bar.update(index - 1)
    with open(path, "rb") as f:
      data = f.read()
    image, reason = (None, None) if checks else _decodable(data)
    if reason is None:
      start = time.perf_counter()
      out = {k: v.numpy()[0] for k, v in serve(encoded_images=tf.constant([data])).items()}
      seconds = time.perf_counter() - start
      if checks and not out["valid_image"]:
        reason = _refusal(data, max_side)
      elif image is None:
        image, reason = _decodable(data)  # accepted by the model, so at most max_side a side
    if reason is not None:
      report.skipped.append((path, reason))
      continue
    times.append(seconds)
    stem = os.path.splitext(os.path.basename(path))[0]
    stem = f"{stem}_{index}" if stem in stems else stem  # a.jpg and a.png, or two folders' a.png
    stems.add(stem)
    target = os.path.join(out_dir, f"{stem}.png")
    if detection:
      keep = (np.arange(len(out["scores"])) < out["num_detections"]) & (out["scores"] >= score_threshold)
      boxes, classes, scores = out["boxes"][keep], out["classes"][keep], out["scores"][keep]
      draw_detections(image, boxes, classes, scores, class_names).save(target)
      for (y0, x0, y1, x1), label, score in zip(boxes, classes, scores):
        results.append({"file_name": os.path.basename(path), "image_id": index,
                        "category_id": category_ids[label] if label < len(category_ids) else int(label) + 1,
                        "category_name": _class_name(class_names, label),
                        "bbox": [round(float(v), 2) for v in (x0, y0, x1 - x0, y1 - y0)],
                        "score": round(float(score), 5)})
    else:
      height, width = out["image_hw"]
      labels = out["labels"][:height, :width]
      blend_labels(image, labels, class_names).save(target)
      Image.fromarray(np.clip(labels, 0, 255).astype(np.uint8)).save(os.path.join(out_dir, f"{stem}.labels.png"))
    report.written.append(target)
  if bar is not None:
    bar.update(len(files), finalize=True)
  if detection:
    report.detections_json = os.path.join(out_dir, "detections.json")
    with open(report.detections_json, "w") as f:
      json.dump(results, f, indent=1)
  report.seconds_per_image = float(np.median(times)) if times else 0.0
  return report
