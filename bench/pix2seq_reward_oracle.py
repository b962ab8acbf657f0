"""Does the detection reward rank a Pix2Seq model's sequences the way COCO mAP does? (a diagnostic, run by hand)

For each validation image, decode the greedy sequence and N samples at temperature T (inside XLA), reward them
against the ground truth (`tfreward.rewards.detection`), then score four choices of one sequence per image with
the COCO evaluation `detect` uses (every slot a detection, scored by its conf distribution), side by side:
greedy, the first sample, the best of greedy + samples by reward (an oracle that needs the ground truth), and the
worst sample. If the reward-best sequences score a higher mAP than greedy, the reward is aligned with mAP and
reward tuning has headroom: moving the model toward them is an optimisation question, not an objective one.

  python bench/pix2seq_reward_oracle.py MODEL_DIR [NUM_SAMPLES] [TEMPERATURE]    # e.g. runs/p2s_mle 8 0.6

Measured on the MLE run of configs/shapes/pix2seq_mle.yaml (N = 8, T = 0.6, 500 validation images, about 1 min):
greedy mAP 0.290 / mAP50 0.492, first sample 0.215 / 0.415, best by reward 0.347 / 0.587, worst 0.115 / 0.242
(mean reward: greedy 1.909, samples 1.575, best 2.198). On the earlier, smaller model (encoder_width 32, no encoder
layer): greedy 0.197 / 0.364, first sample 0.134 / 0.274, best by reward 0.271 / 0.488, worst 0.054 / 0.134.
"""

import os
import sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import numpy as np
import tensorflow as tf

from tfreward.config import load_config
from tfreward.models.pix2seq import SamplingOptions
from tfreward.training import trainer, coco_eval
from tfreward.rewards import detection
from tfreward.ops import sequence

model_dir = sys.argv[1]
N = int(sys.argv[2]) if len(sys.argv) > 2 else 8
T = float(sys.argv[3]) if len(sys.argv) > 3 else 0.6
cfg = load_config(trainer.saved_config_dict(model_dir))
model = trainer.load_trained_model(cfg, model_dir)
o = model.options

def to_dets(tokens, logits):
  every_slot = tf.where(sequence.token_kinds(model.seq_len) == sequence.CONF, o.max_conf, tokens)
  found = sequence.sequence_to_detections(every_slot, logits=logits, **model.layout)
  ymin, xmin, ymax, xmax = tf.unstack(found["boxes"], axis=-1)
  boxes = tf.stack([tf.minimum(ymin, ymax), tf.minimum(xmin, xmax), tf.maximum(ymin, ymax),
                    tf.maximum(xmin, xmax)], -1)
  return {"boxes": boxes, "scores": found["scores"], "classes": found["classes"],
          "num_detections": tf.fill([tf.shape(tokens)[0]], o.num_boxes)}

@tf.function(jit_compile=True)
def run(images, boxes, classes, valid):
  memory = model.encoder(images)
  g = model.sample(memory, SamplingOptions(greedy=True), num_samples=1, return_logits=True)
  s = model.sample(memory, SamplingOptions(temperature=T), num_samples=N, seed=tf.constant([1, 2]),
                   return_logits=True)
  tokens = tf.concat([g["tokens"], s["tokens"]], 1)  # [B, 1+N, L]
  logits = tf.concat([g["logits"], s["logits"]], 1)
  gt = sequence.boxes_to_sequence(boxes, classes, valid, order="fixed", seq_len=6 * boxes.shape[1], **model.layout)
  r, _ = detection.detection_reward(tokens, gt, **model.reward_config)  # [B, 1+N]
  best = tf.argmax(r, axis=1, output_type=tf.int32)
  worst = tf.argmin(r[:, 1:], axis=1, output_type=tf.int32) + 1
  pick = lambda idx: (tf.gather(tokens, idx, batch_dims=1), tf.gather(logits, idx, batch_dims=1))
  return r, [to_dets(*pick(tf.zeros_like(best))), to_dets(*pick(tf.ones_like(best))), to_dets(*pick(best)),
            to_dets(*pick(worst))]

names = ["greedy", "sample1", "best_by_reward", "worst_sample"]
evals = [coco_eval.CocoDetectionEvaluator(image_size=tuple(model.image_size)) for _ in names]
rs = []
for images, labels in trainer.eval_dataset(cfg):
  r, dets = run(images, labels["boxes"], labels["classes"], labels["valid"])
  rs.append(r.numpy())
  for e, d in zip(evals, dets):
    e.update(d, labels)
rs = np.concatenate(rs)
print(model_dir, f"N={N} T={T}", "mean reward: greedy %.3f, samples %.3f, best %.3f"
      % (rs[:, 0].mean(), rs[:, 1:].mean(), rs.max(1).mean()))
for n, e in zip(names, evals):
  m = e.result()
  print(f"  {n:16s} mAP {m['mAP']:.3f} mAP50 {m['mAP50']:.3f} AR100 {m['AR100']:.3f}")
