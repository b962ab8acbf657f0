"""Object-detection reward of "Tuning computer vision models with task rewards" (arXiv 2302.08242, seed 000).

For each IoU threshold, a predicted box is assigned to the same-class ground-truth box with the highest IoU above the
threshold (ties: lowest GT index); each GT keeps the assigned prediction with the highest IoU (ties: lowest prediction
index) as its match. The reward is the sum of the class weights of matched GTs minus `nms_w` times the class weights
of the other assigned predictions (duplicates). Class weights favour rare classes:
`w_c = num_cls * v_c / sum(v)`, `v_c = 1 / (count_c + cls_smooth * sum(count))`.

Thresholds: the reference stores each threshold's result under a one-decimal key, so 0.55 and 0.6 share "0.6" and so
on; its final mean then weights the surviving results unevenly (tests/data/detection_reward, README section 4). Here the
default is the uniform mean over the distinct thresholds; `legacy_threshold_keys=True` reproduces the reference.

Everything is float32, static-shape and XLA-compilable; sequences are decoded by `tfreward.ops.sequence`.
"""

import numbers

import tensorflow as tf

from tfreward.ops import sequence

# Per-class instance counts of COCO, in the reference's (contiguous 0..79) class order.
COCO_CLS_COUNTS = (
    262465, 7113, 43867, 8725, 5135, 6069, 4571, 9973, 10759, 12884, 1865, 1983, 1285, 9838, 10806, 4768,
    5508, 6587, 9509, 8147, 5513, 1294, 5303, 5131, 8720, 11431, 12354, 6496, 6192, 2682, 6646, 2685,
    6347, 9076, 3276, 3747, 5543, 6126, 4812, 24342, 7913, 20650, 5479, 7770, 6165, 14358, 9458, 5851,
    4373, 6399, 7308, 7852, 2918, 5821, 7179, 6353, 38491, 5779, 8652, 4192, 15714, 4157, 5805, 4970,
    2262, 5703, 2855, 6434, 1673, 3334, 225, 5610, 2637, 24715, 6334, 6613, 1481, 4793, 198, 1954,
)

PAPER_REWARD_THR = (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)


def class_weights(cls_counts, *, cls_smooth):
  """Frequency-based class weights, float32 as in the reference.

  Args:
    cls_counts: [num_cls] int instance counts (a sequence or tensor).
    cls_smooth: float. Smoothing: adds `cls_smooth * sum(counts)` to every count.

  Returns:
    [num_cls] float32 weights averaging 1.
  """
  counts = tf.convert_to_tensor(cls_counts)
  total = tf.cast(tf.reduce_sum(tf.cast(counts, tf.int64)), tf.float32)
  inverse = 1.0 / (tf.cast(counts, tf.float32) + tf.constant(cls_smooth, tf.float32) * total)
  num_cls = tf.cast(tf.size(counts), tf.float32)
  return num_cls * inverse / tf.reduce_sum(inverse)


def _reward_iou(boxes_pred, boxes_gt):
  """Pairwise IoU with the reference's arithmetic. [..., P, 4], [..., G, 4] yxyx -> [..., P, G] float32.

  Not `tfreward.ops.boxes.pairwise_iou`: the reference divides by `union + 1e-9` and takes absolute areas, which
  moves IoUs of tiny boxes (a 1-bin box: 0.999 instead of 1.0) and must be reproduced for parity.
  """
  a = boxes_pred[..., :, None, :]  # [..., P, 1, 4]
  b = boxes_gt[..., None, :, :]  # [..., 1, G, 4]
  area_a = tf.abs((a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1]))
  area_b = tf.abs((b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1]))
  inter_y = tf.maximum(0.0, tf.minimum(a[..., 2], b[..., 2]) - tf.maximum(a[..., 0], b[..., 0]))
  inter_x = tf.maximum(0.0, tf.minimum(a[..., 3], b[..., 3]) - tf.maximum(a[..., 1], b[..., 1]))
  inter = inter_x * inter_y
  return inter / (area_a + area_b - inter + 1e-9)


def _first_argmax(values, axis):
  """Index of the first maximum along `axis` (a fixed tie-break; `tf.argmax` promises none)."""
  size = values.shape[axis]
  best = tf.reduce_max(values, axis=axis, keepdims=True)
  shape = [1] * values.shape.rank
  shape[axis] = size
  index = tf.reshape(tf.range(size), shape)
  return tf.reduce_min(tf.where(values == best, index, size), axis=axis)


def _reward_at(iou, labels_pred, labels_gt, present_pred, weights, thresholds, nms_w):
  """All thresholds from one assignment pass.

  The reference assigns and matches once per threshold. Both steps are threshold-free: raising the threshold only
  zeroes IoUs, which moves neither a prediction's best GT (its maximum stays where it was, or the row is empty) nor a
  GT's best assigned prediction. So each prediction p keeps its best IoU m_p (at GT g_p), each GT g the best m_p
  assigned to it, c_g (won by the first such p), and at threshold t: g is matched iff c_g > t; p is a duplicate iff
  m_p > t and p did not win g_p. That is O(P G) once plus O(D (P + G)), instead of O(D P G).

  Args:
    iou: [B, N, P, G] float32, already 0 for ineligible pairs (either slot padding, or different classes).
    labels_pred: [B, N, P] int32. labels_gt: [B, 1, G] int32. present_pred: [B, N, P] bool.
    weights: [num_cls] float32 class weights.
    thresholds: D Python floats. nms_w: float.

  Returns:
    dict of reward, nms_penalty [D, B, N] float32, num_matches [D, B, N] int32, correct [D, B, N, P] int32 and
    match_iou [D, B, N, P] float32.
  """
  num_pred, num_gt = iou.shape[-2], iou.shape[-1]
  best_gt = _first_argmax(iou, -1)  # [B, N, P]
  best_iou = tf.reduce_max(iou, axis=-1)  # [B, N, P], m_p
  assigned_to = tf.equal(best_gt[..., None], tf.range(num_gt))  # [B, N, P, G], one True per row
  kept = tf.where(assigned_to, best_iou[..., None], 0.0)  # each prediction keeps only its best GT
  gt_best = tf.reduce_max(kept, axis=-2)  # [B, N, G], c_g
  winner = _first_argmax(kept, -2)  # [B, N, G]
  won = tf.reduce_any(assigned_to & tf.equal(winner[..., None, :], tf.range(num_pred)[:, None]), axis=-1)  # [B, N, P]

  thr = tf.reshape(tf.constant(thresholds, tf.float32), [-1, 1, 1, 1])  # [D, 1, 1, 1]
  matched = gt_best[None] > thr  # [D, B, N, G]
  assigned = best_iou[None] > thr  # [D, B, N, P]
  w_gt = tf.gather(weights, labels_gt)  # [B, 1, G]
  w_pred = tf.gather(weights, labels_pred)  # [B, N, P]
  match_reward = tf.reduce_sum(tf.where(matched, w_gt, 0.0), axis=-1)  # [D, B, N]
  nms_penalty = tf.reduce_sum(tf.where(assigned & ~won, w_pred, 0.0), axis=-1)  # [D, B, N]
  return {
      "reward": match_reward - tf.constant(nms_w, tf.float32) * nms_penalty,
      "num_matches": tf.reduce_sum(tf.cast(matched, tf.int32), axis=-1),
      "nms_penalty": nms_penalty,
      "correct": tf.where(present_pred, tf.cast(assigned, tf.int32) + 1, 0),
      "match_iou": tf.where(assigned, best_iou, 0.0),
  }


def _legacy_read_back(reward_thr):
  """For each threshold, the index of the threshold whose result the reference reads back under its key.

  The reference writes threshold `thr` under `f"{thr:0.1f}"` with Python floats (a later threshold overwrites an
  earlier one with the same key) and then reads each threshold's key back for its mean.
  """
  keys = [f"{float(t):0.1f}" for t in reward_thr]
  last = {key: i for i, key in enumerate(keys)}
  return [last[key] for key in keys]


def legacy_threshold_weights(reward_thr):
  """Multiplicity of each threshold in the reference's mean: Python ints in `reward_thr` order, summing to T."""
  counts = [0] * len(reward_thr)
  for i in _legacy_read_back(reward_thr):
    counts[i] += 1
  return counts


def _check_config(max_level, max_conf, num_cls, reward_thr, correct_thr, cls_counts):
  sequence.TokenLayout(max_level, max_conf, num_cls)  # validates the three ints
  thr = tuple(reward_thr)
  if not thr or any(isinstance(t, bool) or not isinstance(t, numbers.Real) or not 0.0 <= t <= 1.0 for t in thr):
    raise ValueError(f"reward_thr must be a non-empty sequence of floats in [0, 1], got {reward_thr!r}.")
  if isinstance(correct_thr, bool) or not isinstance(correct_thr, numbers.Real) or not 0.0 <= correct_thr <= 1.0:
    raise ValueError(f"correct_thr must be a float in [0, 1], got {correct_thr!r}.")
  length = tf.convert_to_tensor(cls_counts).shape.num_elements()
  if length != num_cls:
    raise ValueError(f"cls_counts must have num_cls={num_cls} entries, got {length}: {cls_counts!r}.")
  return thr


def detection_reward(seqs_pred, seqs_gt, *, max_level=1000, max_conf=2, num_cls=80, nms_w=0.3, cls_smooth=0.05,
                     reward_thr=PAPER_REWARD_THR, correct_thr=0.5, cls_counts=COCO_CLS_COUNTS,
                     legacy_threshold_keys=False):
  """Detection reward of N sampled sequences per image against the ground truth (seed 000's `reward_fn`).

  Args:
    seqs_pred: [B, N, Lp] int32 (or int64) predicted token sequences, N samples per image, layout of
      `tfreward.ops.sequence`; the last `Lp % 6` tokens are ignored and out-of-range tokens are clipped.
    seqs_gt: [B, Lg] int32 (or int64) ground-truth sequences, shared by the N samples. Slots with conf token 0 are
      padding (an image may have no objects: its reward is 0 minus nothing, i.e. 0).
    max_level: int. Coordinate bins. Defaults to 1000.
    max_conf: int. Highest conf token. Defaults to 2.
    num_cls: int. Number of classes. Defaults to 80.
    nms_w: float. Weight of the duplicate penalty. Defaults to 0.3.
    cls_smooth: float. Class-weight smoothing. Defaults to 0.05.
    reward_thr: sequence of float IoU thresholds (strict `iou > thr`, thr rounded to float32). Defaults to
      0.5, 0.55, ..., 0.95.
    correct_thr: float. Threshold of `aux["correct"]` and `aux["match_iou"]`. Defaults to 0.5.
    cls_counts: [num_cls] int instance counts for the class weights. Defaults to `COCO_CLS_COUNTS`.
    legacy_threshold_keys: bool. Average the thresholds with the reference's colliding-key multiplicities
      (`legacy_threshold_weights`) instead of uniformly over the distinct thresholds. Defaults to False.

  Returns:
    reward: [B, N] float32, the mean over thresholds.
    aux: dict of
      correct: [B, N, Lp // 6] int32 at `correct_thr`: 0 padding slot, 1 present but unassigned, 2 assigned to a GT.
      match_iou: [B, N, Lp // 6] float32 at `correct_thr`: IoU with the assigned GT, else 0.
      num_matches, nms_penalty: [B, N] float32, means over thresholds like `reward` (penalty before `nms_w`).
      reward_thr, nms_penalty_thr: [T, B, N] float32 and num_matches_thr: [T, B, N] int32, per threshold in
        `reward_thr` order.
  """
  thr = _check_config(max_level, max_conf, num_cls, reward_thr, correct_thr, cls_counts)
  seqs_pred = tf.convert_to_tensor(seqs_pred)
  seqs_gt = tf.convert_to_tensor(seqs_gt)
  for name, seqs, rank in (("seqs_pred", seqs_pred, 3), ("seqs_gt", seqs_gt, 2)):
    if not seqs.dtype.is_integer:
      raise ValueError(f"{name} must be an integer tensor, got dtype {seqs.dtype.name}.")
    if seqs.shape.rank != rank or seqs.shape[-1] is None or seqs.shape[-1] < sequence.TOKENS_PER_BOX:
      raise ValueError(f"{name} must have rank {rank} and a static length >= 6, got shape {seqs.shape}.")
  if not seqs_pred.shape[:1].is_compatible_with(seqs_gt.shape[:1]):
    raise ValueError(f"seqs_pred {seqs_pred.shape} and seqs_gt {seqs_gt.shape} have different batch sizes.")

  layout = dict(max_level=max_level, max_conf=max_conf, num_cls=num_cls)
  boxes_pred, labels_pred, confs_pred = sequence.decode_sequence(seqs_pred, **layout)  # [B, N, P, 4]
  boxes_gt, labels_gt, confs_gt = sequence.decode_sequence(seqs_gt[:, None], **layout)  # [B, 1, G, 4]
  present_pred = confs_pred > 0  # [B, N, P]
  eligible = (present_pred[..., :, None] & (confs_gt > 0)[..., None, :]
              & tf.equal(labels_pred[..., :, None], labels_gt[..., None, :]))  # [B, N, P, G]
  iou = tf.where(eligible, _reward_iou(boxes_pred, boxes_gt), 0.0)
  weights = class_weights(cls_counts, cls_smooth=cls_smooth)

  distinct = sorted(set(float(t) for t in thr) | {float(correct_thr)})
  per_value = _reward_at(iou, labels_pred, labels_gt, present_pred, weights, distinct, nms_w)  # [D, ...]
  thr_index = [distinct.index(float(t)) for t in thr]
  per_thr = {k: tf.gather(per_value[k], thr_index) for k in ("reward", "num_matches", "nms_penalty")}  # [T, B, N]

  if legacy_threshold_keys:
    picks = _legacy_read_back(thr)  # T indices, in the reference's order
  else:
    picks = sorted({float(t): i for i, t in enumerate(thr)}.values())  # one index per distinct threshold

  def mean(per_threshold):  # [T, B, N] -> [B, N] float32
    return tf.reduce_mean(tf.gather(tf.cast(per_threshold, tf.float32), picks), axis=0)

  at_correct = distinct.index(float(correct_thr))
  aux = {
      "correct": per_value["correct"][at_correct],
      "match_iou": per_value["match_iou"][at_correct],
      "num_matches": mean(per_thr["num_matches"]),
      "nms_penalty": mean(per_thr["nms_penalty"]),
      "reward_thr": per_thr["reward"],
      "num_matches_thr": per_thr["num_matches"],
      "nms_penalty_thr": per_thr["nms_penalty"],
  }
  return mean(per_thr["reward"]), aux
