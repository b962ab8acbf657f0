"""Predictions of trained segmentation runs side by side on the same validation images, as one PNG.

`write_segmentation_comparison(path, model_dirs, labels)`: the first `num_images` validation images of the first
run's dataset, their ground truth, then each run's `segment` output (`tfreward compare ...` on the command line).
"""

import numpy as np

from tfreward.config import load_config
from tfreward.data import preview
from tfreward.errors import UserError
from tfreward.training import trainer


def write_segmentation_comparison(path, model_dirs, labels=None, *, num_images=8):
  """Writes the PNG; returns `path`. labels: one column name per run (default: the directories)."""
  labels = list(labels) if labels else list(model_dirs)
  if len(labels) != len(model_dirs):
    raise UserError(f"give one --label per run: {len(labels)} labels for {len(model_dirs)} runs.")
  configs = [load_config(trainer.saved_config_dict(d)) for d in model_dirs]
  if any(c.data.task != "segmentation" for c in configs):
    raise UserError("compare draws segmentation runs; a run here has data.task=detection.")
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
