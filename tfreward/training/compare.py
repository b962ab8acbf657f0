"""Runs side by side on the same validation images: a picture and, for segmentation, a table of where they differ.

`write_segmentation_comparison(path, model_dirs, labels)` draws the first `num_images` validation images of the
first run's dataset, their ground truth, then each run's `segment` output (`tfreward compare ...`);
`write_detection_comparison` does the same for detection runs: the ground-truth boxes, then each run's detections
scoring at least `min_score`.
`segmentation_error_table(model_dirs, labels)` scores each run over the whole validation split: mIoU, the mean over
images of each image's own mIoU (the reward's objective, `rewards.segmentation.per_image_iou`; images with no
labelled pixel skipped), the IoU of every class, and pixel accuracy on the ground truth's boundary band (labelled pixels within `band` pixels of a pixel of
another label) against the interior (the other labelled pixels); a Markdown table, one row per run.
"""

import numpy as np
import tensorflow as tf

from tfreward.config import load_config
from tfreward.data import preview
from tfreward.errors import UserError
from tfreward.rewards import segmentation as segmentation_reward
from tfreward.training import metrics as metrics_lib
from tfreward.training import trainer


def _runs(model_dirs, labels, task="segmentation"):
  labels = list(labels) if labels else list(model_dirs)
  if len(labels) != len(model_dirs):
    raise UserError(f"give one --label per run: {len(labels)} labels for {len(model_dirs)} runs.")
  configs = [load_config(trainer.saved_config_dict(d)) for d in model_dirs]
  if any(c.data.task != task for c in configs):
    raise UserError(f"compare reads runs of one task; here: {sorted({c.data.task for c in configs})}, needed {task}.")
  return labels, configs


def runs_task(model_dirs):
  """The data.task of the first run: "segmentation" or "detection"."""
  return load_config(trainer.saved_config_dict(model_dirs[0])).data.task


def write_detection_comparison(path, model_dirs, labels=None, *, num_images=8, min_score=0.3):
  """Writes the PNG; returns `path`. Each run's `detect` output on the same images, boxes scoring >= `min_score`."""
  labels, configs = _runs(model_dirs, labels, task="detection")
  config = configs[0]
  images, batch = next(iter(trainer.eval_dataset(config)))
  images = images.numpy()[:num_images]
  valid = batch["valid"].numpy()[:num_images]
  columns = {"ground truth": [(b[v], c[v]) for b, c, v in zip(batch["boxes"].numpy(), batch["classes"].numpy(),
                                                                  valid)]}
  for label, run_config, model_dir in zip(labels, configs, model_dirs):
    model = trainer.load_trained_model(run_config, model_dir)
    found = {k: v.numpy() for k, v in tf.function(model.detect, jit_compile=True)(images).items()}
    keep = (found["scores"] >= min_score) & (np.arange(found["scores"].shape[1]) < found["num_detections"][:, None])
    columns[label] = [(b[k], c[k]) for b, c, k in zip(found["boxes"], found["classes"], keep)]
  names = trainer.dataset_spec(config).class_names
  grid = preview.render_box_columns(images.astype(np.uint8), columns, class_names=names,
                                    title=f"{config.data.dataset} {config.data.eval_split}, score >= {min_score}")
  grid.save(path, format="PNG")
  return path


def write_segmentation_comparison(path, model_dirs, labels=None, *, num_images=8):
  """Writes the PNG; returns `path`. labels: one column name per run (default: the directories)."""
  labels, configs = _runs(model_dirs, labels)
  config = configs[0]
  batch = next(iter(trainer.eval_dataset(config)))
  images, masks = batch[0].numpy()[:num_images], batch[1]["mask"].numpy()[:num_images]
  columns = {"ground truth": masks}
  for label, run_config, model_dir in zip(labels, configs, model_dirs):
    model = trainer.load_trained_model(run_config, model_dir)
    columns[label] = model.segment(images)["labels"].numpy()
  names = trainer.dataset_spec(config).segmentation_class_names
  # Label k is drawn in the colour of legend entry k - 1 (0 = background in tfreward_shapes).
  grid = preview.render_label_maps(images, columns, class_names=names[1:],
                                   title=f"{config.data.dataset} {config.data.eval_split}")
  grid.save(path, format="PNG")
  return path


def boundary_band(mask, band, ignore_index=255):
  """[B, H, W] int labels -> [B, H, W] bool: labelled pixels within `band` pixels (Chebyshev) of another label."""
  mask = tf.convert_to_tensor(mask)
  window = 2 * band + 1
  as_float = tf.cast(mask, tf.float32)[..., None]
  high = tf.nn.max_pool2d(as_float, window, 1, "SAME")[..., 0]
  low = -tf.nn.max_pool2d(-as_float, window, 1, "SAME")[..., 0]
  return ((high != low) & (mask != ignore_index)).numpy()


def segmentation_error_table(model_dirs, labels=None, *, band=2):
  """Markdown table of mIoU, per-image mIoU, per-class IoU and boundary-band / interior accuracy of each run."""
  labels, configs = _runs(model_dirs, labels)
  names = trainer.dataset_spec(configs[0]).segmentation_class_names
  header = ["run", "mIoU", "per-image mIoU"] + list(names) + [f"acc. boundary ({band} px)", "acc. interior"]
  rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for label, config, model_dir in zip(labels, configs, model_dirs):
    model = trainer.load_trained_model(config, model_dir)
    segment = tf.function(model.segment, jit_compile=True)
    metric = metrics_lib.StreamingMeanIoU(len(names), accumulator_dtype="float64")
    correct, count = np.zeros(2), np.zeros(2)
    image_mious = []
    for images, batch_labels in trainer.eval_dataset(config):
      mask = batch_labels["mask"].numpy()
      mask[~batch_labels["example_valid"].numpy()] = 255
      predicted = segment(images)["labels"].numpy()
      metric.update_state(mask, predicted)
      image_mious.append(segmentation_reward.per_image_iou(predicted, mask, num_classes=len(names))["miou"].numpy())
      edge = boundary_band(mask, band)
      inner = (mask != 255) & ~edge
      for i, region in enumerate((edge, inner)):
        correct[i] += (predicted[region] == mask[region]).sum()
        count[i] += region.sum()
    iou = metric.per_class_iou().numpy()
    image_miou = np.concatenate(image_mious)
    cells = [label, f"{float(metric.result()):.4f}", f"{np.nanmean(image_miou):.4f}"] + [f"{v:.3f}" for v in iou] + [
        f"{c / max(n, 1):.4f}" for c, n in zip(correct, count)]
    rows.append("| " + " | ".join(cells) + " |")
  return "\n".join(rows)
