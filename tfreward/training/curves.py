"""Learning curves of finished or running trainings, read from their TensorBoard logs.

`tfreward train` writes epoch-level scalars to `<model_dir>/logs/train` (losses, learning rate) and
`<model_dir>/logs/validation` (the evaluation metrics: `mAP`, `mAP50`, ... or `mIoU`). `read_scalars` reads them back;
`compare_runs` puts several runs side by side as a Markdown table and a PNG plot over training steps
(step = (epoch + 1) * train.steps_per_epoch from each run's config.yaml). Runs that share a label (e.g. seeds of one
config) form one curve: the mean over the runs, with their range as "min-max" in the table and a band in the plot.

  tfreward curves runs/group_detr runs/group_detr_1 --label "11 groups" --label "1 group" --out curves.png
  tfreward curves runs/a_s0 runs/a_s1 runs/b_s0 runs/b_s1 --label a --label a --label b --label b
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
  """Side-by-side validation curves of several runs; runs with the same label are averaged.

  Args:
    model_dirs: sequence of run directories.
    labels: optional sequence of names, one per run. Defaults to the directories' base names. Runs that share a
      label form one curve: the mean over those of them evaluated at each step, and their range.
    metrics: validation tags to show (one plot panel and one table column group each).
    out: optional PNG path for the plot (a band shows the range of grouped runs).

  Returns:
    str: a Markdown table, one row per evaluated step, one column per (metric, label): the value, or for a group
    "mean (min-max, n runs)"; "" where no run of the label has a value.
  """
  labels = list(labels) if labels else [os.path.basename(os.path.normpath(d)) for d in model_dirs]
  if len(labels) != len(model_dirs):
    raise UserError(f"got {len(labels)} labels for {len(model_dirs)} runs.")
  names = list(dict.fromkeys(labels))  # distinct labels, first-seen order
  curves = {(metric, name): {} for metric in metrics for name in names}  # -> {step: [values of the label's runs]}
  for model_dir, label in zip(model_dirs, labels):
    scalars, per_epoch = read_scalars(model_dir), steps_per_epoch(model_dir)
    for metric in metrics:
      if metric not in scalars:
        raise UserError(f"{model_dir!r} logged no validation metric {metric!r} (it has: {', '.join(sorted(scalars))}).")
      for epoch, value in scalars[metric]:
        curves[metric, label].setdefault((epoch + 1) * per_epoch, []).append(value)
  steps = sorted({s for points in curves.values() for s in points})
  header = ["step"] + [f"{metric} {name}" for metric in metrics for name in names]
  rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for step in steps:
    cells = [str(step)] + [_cell(curves[m, n].get(step)) for m in metrics for n in names]
    rows.append("| " + " | ".join(cells) + " |")
  if out:
    _plot(curves, metrics, names, out)
  return "\n".join(rows)


def _cell(values):
  if not values:
    return ""
  if len(values) == 1:
    return f"{values[0]:.3f}"
  return f"{sum(values) / len(values):.3f} ({min(values):.3f}-{max(values):.3f}, {len(values)} runs)"


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
      steps = [step for step, _ in points]
      line, = ax.plot(steps, [sum(v) / len(v) for _, v in points], marker="o", markersize=3, label=label)
      if any(len(v) > 1 for _, v in points):
        ax.fill_between(steps, [min(v) for _, v in points], [max(v) for _, v in points], color=line.get_color(),
                        alpha=0.2, linewidth=0)
    ax.set_title(f"validation {metric}")
    ax.set_xlabel("training step")
    ax.grid(alpha=0.3)
    ax.legend()
  for ax in list(axes.flat)[len(metrics):]:
    ax.axis("off")
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  fig.savefig(out, dpi=110)
  plt.close(fig)
