"""Small random inputs for every loss, shared by the non-finite and degenerate-box tests; and a runner that returns
the outputs and the gradients of a loss, eagerly or compiled with XLA."""

import functools

import numpy as np
import tensorflow as tf

from tfreward.losses import detr, free_anchor, reinforce, retinanet, yolox
from tfreward.ops import anchors as anchor_ops
from tfreward.ops import sequence

YOLOX_STRIDES = (8, 16, 32)
REINFORCE_LAYOUT = dict(max_level=20, max_conf=2, num_cls=3)


@functools.lru_cache(maxsize=None)
def _step(loss_fn, watch, jit):
  """The outputs-and-gradients function of `loss_fn`, compiled once per loss (the problems reuse their loss_fn)."""
  def fn(**kwargs):
    watched = tf.nest.flatten([kwargs[name] for name in watch])
    with tf.GradientTape() as tape:
      tape.watch(watched)
      out = loss_fn(**kwargs)
      total = tf.add_n([v for v in out.values() if v.shape.rank == 0 and v.dtype.is_floating])
    return out, tape.gradient(total, watched, unconnected_gradients=tf.UnconnectedGradients.ZERO)

  return tf.function(fn, jit_compile=True) if jit else fn


def run(loss_fn, inputs, watch, jit):
  """(numpy outputs of loss_fn(**inputs), gradients of the sum of its float scalar outputs w.r.t. `watch`).

  inputs: dict name -> numpy array or nest of them (converted to tensors); watch: names of float inputs.
  """
  fn = _step(loss_fn, tuple(watch), jit)
  out, grads = fn(**{name: tf.nest.map_structure(tf.constant, value) for name, value in inputs.items()})
  return {k: v.numpy() for k, v in out.items()}, [g.numpy() for g in grads]


def scalar_terms(out):
  """The float scalar entries of a loss's output dict."""
  return {k: v for k, v in out.items() if np.ndim(v) == 0 and np.issubdtype(np.asarray(v).dtype, np.floating)}


def grad_norm(grads):
  return float(np.sqrt(sum(np.sum(np.square(g.astype(np.float64))) for g in grads)))


# === Problems: (loss_fn, inputs, watched input names) ===

def yolox_problem(seed=0, num_classes=3, **options):
  """2 images of 64 x 64 (A = 64 + 16 + 4 anchors), 3 object slots (2 and 1 objects), super-gradients-like outputs."""
  rng = np.random.default_rng(seed)
  outputs = []
  for s in YOLOX_STRIDES:
    out = rng.normal(0.0, 1.0, (2, 64 // s, 64 // s, 5 + num_classes))
    out[..., 2:4] = rng.normal(0.5, 0.3, out[..., 2:4].shape)
    out[..., 4:] -= 2.0
    outputs.append(out.astype(np.float32))
  boxes = np.array([[[20.0, 24.0, 16.0, 20.0], [44.0, 40.0, 24.0, 28.0], [0.0, 0.0, 0.0, 0.0]],
                    [[32.0, 30.0, 30.0, 26.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]], np.float32)
  classes = np.array([[0, 2, -1], [1, -1, -1]], np.int32)
  valid = classes >= 0
  loss = _yolox_loss(num_classes, tuple(sorted(options.items())))
  return loss, dict(outputs=outputs, gt_boxes=boxes, gt_classes=classes, gt_valid=valid), ("outputs",)


@functools.lru_cache(maxsize=None)
def _yolox_loss(num_classes, options):
  kwargs = dict(strides=YOLOX_STRIDES, num_classes=num_classes, use_l1=True, **dict(options))
  return lambda **x: yolox.yolox_loss(x["outputs"], x["gt_boxes"], x["gt_classes"], x["gt_valid"], **kwargs)


@functools.lru_cache(maxsize=None)
def _detr_loss(num_groups):
  return lambda **x: detr.group_detr_loss(**x, num_groups=num_groups, gt_box_format="cxcywh")


@functools.lru_cache(maxsize=None)
def _reinforce_loss():
  return lambda **x: reinforce.reinforce_losses(**x, **REINFORCE_LAYOUT)


def yolox_cell(outputs, anchor):
  """Anchor index -> (level, row, column) in the YOLOX outputs."""
  for level, out in enumerate(outputs):
    cells = out.shape[1] * out.shape[2]
    if anchor < cells:
      return (level,) + divmod(anchor, out.shape[2])
    anchor -= cells
  raise IndexError(anchor)


def _anchor_problem(seed, num_classes=4):
  """2 images of 64 x 64 with the RetinaNet anchors (A = 765), 3 GT slots (2 and 1 objects), xyxy pixels."""
  rng = np.random.default_rng(seed)
  anchors = anchor_ops.retinanet_anchors((64, 64)).numpy()
  gt = np.array([[[4.0, 6.0, 30.0, 40.0], [30.0, 20.0, 60.0, 44.0], [0.0, 0.0, 0.0, 0.0]],
                 [[10.0, 12.0, 50.0, 36.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]], np.float32)
  classes = np.array([[0, 3, -1], [1, -1, -1]], np.int32)
  return dict(anchors=anchors, cls_logits=rng.normal(-2.0, 1.5, (2, len(anchors), num_classes)).astype(np.float32),
              box_deltas=rng.normal(0.0, 0.5, (2, len(anchors), 4)).astype(np.float32), gt_boxes=gt,
              gt_classes=classes, gt_valid=classes >= 0)


def free_anchor_problem(seed=0):
  return free_anchor.free_anchor_loss, _anchor_problem(seed), ("cls_logits", "box_deltas")


def retinanet_problem(seed=0):
  return retinanet.retinanet_loss, _anchor_problem(seed), ("cls_logits", "box_deltas")


def detr_problem(seed=0, num_groups=2, num_queries=4, num_classes=3):
  """2 images, G groups of Q queries, one auxiliary layer; 3 target slots (2 and 1 objects), normalised cxcywh."""
  rng = np.random.default_rng(seed)
  n = num_groups * num_queries

  def layer():
    logits = rng.normal(-1.0, 1.5, (2, n, num_classes)).astype(np.float32)
    boxes = np.concatenate([rng.uniform(0.2, 0.8, (2, n, 2)), rng.uniform(0.1, 0.4, (2, n, 2))], -1)
    return logits, boxes.astype(np.float32)

  logits, boxes = layer()
  gt = np.array([[[0.3, 0.3, 0.2, 0.3], [0.6, 0.7, 0.3, 0.2], [0.0, 0.0, 0.0, 0.0]],
                 [[0.5, 0.5, 0.4, 0.4], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]], np.float32)
  classes = np.array([[0, 2, -1], [1, -1, -1]], np.int32)
  inputs = dict(pred_logits=logits, pred_boxes=boxes, gt_boxes=gt, gt_classes=classes, gt_valid=classes >= 0,
                aux_outputs=(layer(),))
  return _detr_loss(num_groups), inputs, ("pred_logits", "pred_boxes", "aux_outputs")


def reinforce_problem(seed=0, batch=3, slots=3):
  rng = np.random.default_rng(seed)
  vocab = sequence.TokenLayout(**REINFORCE_LAYOUT).vocab_size
  length = 6 * slots
  kinds = sequence.token_kinds(length).numpy()
  tokens = np.where(kinds == sequence.COORD, rng.integers(3, 24, (batch, length)),
                    np.where(kinds == sequence.CLASS, rng.integers(24, 27, (batch, length)),
                             rng.integers(0, 3, (batch, length)))).astype(np.int32)
  inputs = dict(logits=rng.normal(size=(batch, length, vocab)).astype(np.float32) * 2.0, tokens=tokens,
                advantages=rng.normal(size=batch).astype(np.float32),
                match_iou=rng.uniform(0, 1, (batch, slots)).astype(np.float32))
  return _reinforce_loss(), inputs, ("logits",)
