"""What a decoded sequence says, per image: boxes emitted, objects found, duplicates (static-shape, XLA-compilable).

The counts use the detection reward's matching (`tfreward.rewards.detection`) at one IoU threshold with uniform class
weights: a box is emitted when its conf token is > 0; a ground-truth object is found when an emitted box of its class
overlaps it with IoU > `iou_thr` and is its best such box; an emitted box is a duplicate when its best same-class
object (IoU > `iou_thr`) was won by another box. They tell how greedy decoding fails on crowded scenes: stopping too
early (emitted < objects), repeating itself (duplicates), or misplacing boxes (emitted, neither found nor duplicate).
"""

import tensorflow as tf

from tfreward.rewards import detection

STATISTICS = ("emitted", "objects", "found", "duplicates")


def decode_statistics(tokens, gt_tokens, *, max_level, max_conf, num_cls, iou_thr=0.5):
  """Per-image counts of one decoded sequence against the ground truth.

  Args:
    tokens: [B, L] int32 decoded sequences (`tfreward.ops.sequence` layout).
    gt_tokens: [B, Lg] int32 ground-truth sequences; slots with conf token 0 are padding.
    max_level, max_conf, num_cls: int. The token layout.
    iou_thr: float. Match threshold (strict `iou > iou_thr`). Defaults to 0.5.

  Returns:
    dict of [B] int32: emitted (boxes with conf > 0), objects (ground-truth boxes), found (objects matched),
    duplicates (emitted boxes whose best object another box won).
  """
  tokens = tf.convert_to_tensor(tokens)
  if tokens.shape.rank != 2:
    raise ValueError(f"tokens must be [B, L], got shape {tokens.shape}.")
  _, aux = detection.detection_reward(tokens[:, None], gt_tokens, max_level=max_level, max_conf=max_conf,
                                      num_cls=num_cls, nms_w=1.0, reward_thr=(iou_thr,), correct_thr=iou_thr,
                                      cls_counts=[1] * num_cls)
  correct = aux["correct"][:, 0]  # [B, P]: 0 not emitted, 1 emitted, 2 assigned to an object
  found = aux["num_matches_thr"][0, :, 0]  # [B]
  assigned = tf.reduce_sum(tf.cast(correct == 2, tf.int32), axis=-1)
  gt_conf = tf.convert_to_tensor(gt_tokens)[:, 5::6]
  return {
      "emitted": tf.reduce_sum(tf.cast(correct > 0, tf.int32), axis=-1),
      "objects": tf.reduce_sum(tf.cast(gt_conf > 0, tf.int32), axis=-1),
      "found": found,
      "duplicates": assigned - found,
  }


def summarize(totals, num_images):
  """Totals {name: int} over `num_images` images -> per-image means and rates, a dict of Python floats."""
  emitted = max(totals["emitted"], 1)
  return {
      "emitted_per_image": totals["emitted"] / num_images,
      "objects_per_image": totals["objects"] / num_images,
      "recall50": totals["found"] / max(totals["objects"], 1),
      "precision50": totals["found"] / emitted,
      "duplicate_rate": totals["duplicates"] / emitted,
  }
