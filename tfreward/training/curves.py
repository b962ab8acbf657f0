"""Learning curves of finished or running trainings, read from their TensorBoard logs.

`tfreward train` writes epoch-level scalars to `<model_dir>/logs/train` (losses, learning rate) and
`<model_dir>/logs/validation` (the evaluation metrics: `mAP`, `mAP50`, ... or `mIoU`). `read_scalars` reads them back;
`compare_runs` puts several runs side by side as a Markdown table and a PNG plot over training steps
(step = (epoch + 1) * train.steps_per_epoch from each run's config.yaml).

  tfreward curves runs/group_detr runs/group_detr_1 --label "11 groups" --label "1 group" --out curves.png
"""

import glob
import math
import os

import tensorflow as tf
import yaml
from tensorflow.core.util import event_pb2

from tfreward.errors import UserError


def read_scalars(model_dir, split="validation"):
  """dict tag -> sorted list of (epoch, value) from `<model_dir>/logs/<split>`; tags without the `epoch_` prefix.

  When a run was resumed, the last value written for an epoch wins.
  """
  files = sorted(glob.glob(os.path.join(model_dir, "logs", split, "events.out.tfevents.*")), key=os.path.getmtime)
  if not files:
    raise UserError(f"no TensorBoard logs in {os.path.join(model_dir, 'logs', split)!r}; is {model_dir!r} the "
                    "--model-dir of a `tfreward train` run?")
  series = {}
  for path in files:
    for record in tf.data.TFRecordDataset(path):
      event = event_pb2.Event.FromString(record.numpy())
      for value in event.summary.value:
        if value.HasField("tensor"):
          number = float(tf.make_ndarray(value.tensor))
        else:
          number = float(value.simple_value)
        tag = value.tag.removeprefix("epoch_")
        series.setdefault(tag, {})[int(event.step)] = number
  return {tag: sorted(points.items()) for tag, points in series.items()}


def steps_per_epoch(model_dir):
  """`train.steps_per_epoch` of the run in `model_dir` (from its config.yaml)."""
  path = os.path.join(model_dir, "config.yaml")
  if not os.path.exists(path):
    raise UserError(f"{model_dir!r} has no config.yaml; is it the --model-dir of a `tfreward train` run?")
  with open(path) as f:
    raw = yaml.safe_load(f)
  return int(raw["train"]["steps_per_epoch"])


def compare_runs(model_dirs, *, labels=None, metrics=("mAP", "mAP50"), out=None):
  """Side-by-side validation curves of several runs.

  Args:
    model_dirs: sequence of run directories.
    labels: optional sequence of names, one per run. Defaults to the directories' base names.
    metrics: validation tags to show (one plot panel and one table column group each).
    out: optional PNG path for the plot.

  Returns:
    str: a Markdown table, one row per evaluated step, one column per (metric, run); "" where a run has no value.
  """
  labels = list(labels) if labels else [os.path.basename(os.path.normpath(d)) for d in model_dirs]
  if len(labels) != len(model_dirs):
    raise UserError(f"got {len(labels)} labels for {len(model_dirs)} runs.")
  curves = {}  # (metric, label) -> {step: value}
  for model_dir, label in zip(model_dirs, labels):
    scalars, per_epoch = read_scalars(model_dir), steps_per_epoch(model_dir)
    for metric in metrics:
      if metric not in scalars:
        raise UserError(f"{model_dir!r} logged no validation metric {metric!r} (it has: {', '.join(sorted(scalars))}).")
      curves[metric, label] = {(epoch + 1) * per_epoch: value for epoch, value in scalars[metric]}
  steps = sorted({s for points in curves.values() for s in points})
  header = ["step"] + [f"{metric} {label}" for metric in metrics for label in labels]
  rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for step in steps:
    cells = [str(step)] + [f"{curves[m, l][step]:.3f}" if step in curves[m, l] else "" for m in metrics for l in labels]
    rows.append("| " + " | ".join(cells) + " |")
  if out:
    _plot(curves, metrics, labels, out)
  return "\n".join(rows)


def _plot(curves, metrics, labels, out):
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt
  columns = min(len(metrics), 3)
  rows = math.ceil(len(metrics) / columns)
  fig, axes = plt.subplots(rows, columns, figsize=(4.5 * columns, 3.4 * rows), squeeze=False)
  for ax, metric in zip(axes.flat, metrics):
    for label in labels:
      points = sorted(curves[metric, label].items())
      ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3, label=label)
    ax.set_title(f"validation {metric}")
    ax.set_xlabel("training step")
    ax.grid(alpha=0.3)
    ax.set_ylim(bottom=0.0)
    ax.legend()
  for ax in list(axes.flat)[len(metrics):]:
    ax.axis("off")
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  fig.savefig(out, dpi=110)
  plt.close(fig)
