"""Where a segmentation reward run differs from its control, image by image (a diagnostic, run by hand).

Scores every validation image's own mIoU (`tfreward.rewards.segmentation.per_image_iou`, the reward's objective) for
the start model and for paired runs, bins the images by the start model's per-image mIoU (quartiles), and prints,
for each arm, its mean difference to the control per quartile (mean over the seeds, with the standard error).

  python bench/deeplab_per_image.py START_DIR RUNS_ROOT ARM [ARM ...] [--control control] [--seeds 0 1 2 3 4]

Runs are RUNS_ROOT/<arm>_s<seed> (the layout of docs/segmentation.md's commands).
"""

import argparse
import os
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import numpy as np
import tensorflow as tf

from tfreward.config import load_config
from tfreward.rewards import segmentation
from tfreward.training import trainer


def per_image_miou(model_dir):
  """[num_images] float32 per-image mIoU over the validation split (NaN: no labelled pixel)."""
  config = load_config(trainer.saved_config_dict(model_dir))
  model = trainer.load_trained_model(config, model_dir)
  segment = tf.function(model.segment, jit_compile=True)
  num_classes = len(trainer.dataset_spec(config).segmentation_class_names)
  out = []
  for images, labels in trainer.eval_dataset(config):
    mask = labels["mask"].numpy()
    mask[~labels["example_valid"].numpy()] = 255
    predicted = segment(images)["labels"]
    out.append(segmentation.per_image_iou(predicted, mask, num_classes=num_classes)["miou"].numpy())
  return np.concatenate(out)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("start_dir")
  parser.add_argument("runs_root")
  parser.add_argument("arms", nargs="+")
  parser.add_argument("--control", default="control")
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
  args = parser.parse_args()
  start = per_image_miou(args.start_dir)
  scored = ~np.isnan(start)
  edges = np.quantile(start[scored], [0.0, 0.25, 0.5, 0.75, 1.0])
  quartile = np.clip(np.searchsorted(edges, start, side="right") - 1, 0, 3)
  runs = lambda arm: np.stack([per_image_miou(os.path.join(args.runs_root, f"{arm}_s{s}")) for s in args.seeds])
  control = runs(args.control)
  print(f"start model: mean per-image mIoU {np.nanmean(start):.4f}; quartile edges {np.round(edges, 3).tolist()}")
  print(f"{args.control}: mean per-image mIoU {np.nanmean(control[:, scored]):.4f}")
  for arm in args.arms:
    diff = runs(arm) - control  # [S, N]
    cells = []
    for q in range(4):
      per_seed = np.nanmean(diff[:, scored & (quartile == q)], axis=1)
      cells.append(f"Q{q + 1} {per_seed.mean():+.4f} (s.e. {per_seed.std(ddof=1) / np.sqrt(len(per_seed)):.4f})")
    overall = np.nanmean(diff[:, scored], axis=1)
    print(f"{arm} - {args.control}, per quartile of the start model's per-image mIoU: {'; '.join(cells)}; "
          f"all {overall.mean():+.4f} (s.e. {overall.std(ddof=1) / np.sqrt(len(overall)):.4f})")


if __name__ == "__main__":
  main()
