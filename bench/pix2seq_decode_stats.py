"""How a Pix2Seq model's greedy decoding fails, beside its COCO scores (a diagnostic, run by hand).

For the validation split: mAP, mAP50, AR100 of `detect` (what `tfreward evaluate` reports), and from the same greedy
sequences the boxes emitted per image (conf token > 0) against the objects per image, recall and precision at IoU 0.5,
and the duplicate rate (emitted boxes whose best same-class object another box won), from
`tfreward.models.pix2seq.decode_stats`. Several model directories print one row each, side by side.

  python bench/pix2seq_decode_stats.py MODEL_DIR [MODEL_DIR ...]
"""

import os
import sys
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import tensorflow as tf

from tfreward.config import load_config
from tfreward.models.pix2seq import decode_stats
from tfreward.ops import sequence
from tfreward.training import coco_eval, trainer


def measure(model_dir):
  cfg = load_config(trainer.saved_config_dict(model_dir))
  model = trainer.load_trained_model(cfg, model_dir)
  o = model.options

  @tf.function(jit_compile=True)
  def run(images, boxes, classes, valid):
    memory = model.encoder(images, training=False)
    tokens = model.sample(memory, o.detect, num_samples=1, seed=tf.constant([o.seed, 0]))["tokens"][:, 0]
    gt = sequence.boxes_to_sequence(boxes, classes, valid, order="fixed", seq_len=6 * boxes.shape[1], **model.layout)
    return decode_stats.decode_statistics(tokens, gt, **model.layout), model.detect(images)

  evaluator = coco_eval.CocoDetectionEvaluator(image_size=tuple(model.image_size))
  totals = dict.fromkeys(decode_stats.STATISTICS, 0)
  num_images = 0
  for images, labels in trainer.eval_dataset(cfg):
    counts, detections = run(images, labels["boxes"], labels["classes"], labels["valid"])
    evaluator.update(detections, labels)
    for k in totals:
      totals[k] += int(tf.reduce_sum(counts[k]))
    num_images += int(images.shape[0])
  return evaluator.result(), decode_stats.summarize(totals, num_images)


def main(model_dirs):
  print(f"{'model_dir':40s} {'mAP':>6s} {'mAP50':>6s} {'AR100':>6s} {'boxes/img':>9s} {'objects/img':>11s} "
        f"{'recall50':>8s} {'prec50':>6s} {'dup rate':>8s}")
  for model_dir in model_dirs:
    scores, stats = measure(model_dir)
    print(f"{model_dir:40s} {scores['mAP']:6.4f} {scores['mAP50']:6.4f} {scores['AR100']:6.4f} "
          f"{stats['emitted_per_image']:9.2f} {stats['objects_per_image']:11.2f} {stats['recall50']:8.3f} "
          f"{stats['precision50']:6.3f} {stats['duplicate_rate']:8.4f}")


if __name__ == "__main__":
  main(sys.argv[1:])
