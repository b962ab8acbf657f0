"""SimOTA assignment + YOLOX loss per batch: tfreward's batched static-shape version under XLA beside the same
computation written the reference's way (super-gradients `YoloXDetectionLoss`: a loop over images with
data-dependent shapes, a Python loop over objects with a per-object top-k, eager TensorFlow).

Default problem: B = 8 images of 640 x 640 (8400 anchors), 80 classes, 100 object slots with 100, 100, 80, 60, 40,
20, 10 and 0 objects. Each implementation runs in its own subprocess with TensorFlow's BFC allocator on the CPU
(TF_CPU_ALLOCATOR_USE_BFC=true; XLA's buffers go through it too); peak memory is the allocator's peak during the
timed calls (after a warm-up call, so XLA compilation is not counted) above what was allocated before them. The
BFC allocator may hand out a chunk up to 2x (at most +128 MB) larger than requested, so that peak is an upper
bound; for XLA the exact working memory, the compiled program's preallocated temp buffer, is printed too.

  python bench/simota.py                      # forward (assignment + loss), about 1-2 minutes on 2 CPU cores
  python bench/simota.py --grad --repeats 3   # forward and gradient w.r.t. the head outputs
"""

import argparse
import contextlib
import glob
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

STRIDES = (8, 16, 32)
OBJECT_COUNTS = (100, 100, 80, 60, 40, 20, 10, 0)


def make_problem(batch, size, num_classes, max_objects, seed=0):
  """Random boxes and a "partly trained" head: half the cells inside each box predict a noisy copy of it."""
  rng = np.random.default_rng(seed)
  counts = [min(c, max_objects) for c in (OBJECT_COUNTS * (batch // len(OBJECT_COUNTS) + 1))[:batch]]
  outputs = []
  for s in STRIDES:
    g = size // s
    out = np.empty((batch, g, g, 5 + num_classes), np.float32)
    out[..., :2] = 0.5 * rng.normal(size=(batch, g, g, 2))
    out[..., 2:4] = 0.5 * rng.normal(size=(batch, g, g, 2)) + np.log(2.0)
    out[..., 4:] = 2.0 * rng.normal(size=(batch, g, g, 1 + num_classes))
    outputs.append(out)
  boxes = np.zeros((batch, max_objects, 4), np.float32)
  classes = np.full((batch, max_objects), -1, np.int32)
  valid = np.zeros((batch, max_objects), bool)
  rows = []
  for b, n in enumerate(counts):
    wh = np.exp(rng.uniform(np.log(8), np.log(320), size=(n, 2)))
    cxy = rng.uniform(0, size, size=(n, 2))
    boxes[b, :n] = np.round(np.concatenate([cxy, wh], 1) * 4) / 4
    classes[b, :n] = rng.integers(0, num_classes, size=n)
    valid[b, :n] = True
    for j in range(n):
      cx, cy, w, h = boxes[b, j]
      rows.append([b, classes[b, j], cx, cy, w, h])
      for out, s in zip(outputs, STRIDES):
        centres = (np.arange(size // s) + 0.5) * s
        ys, xs = np.nonzero((np.abs(centres[:, None] - cy) < h / 2) & (np.abs(centres[None, :] - cx) < w / 2))
        keep = rng.random(len(ys)) < 0.5
        ys, xs = ys[keep], xs[keep]
        out[b, ys, xs, 0] = cx / s - xs + rng.normal(0, 0.15, len(xs))
        out[b, ys, xs, 1] = cy / s - ys + rng.normal(0, 0.15, len(xs))
        out[b, ys, xs, 2] = np.log(w / s) + rng.normal(0, 0.15, len(xs))
        out[b, ys, xs, 3] = np.log(h / s) + rng.normal(0, 0.15, len(xs))
  return outputs, boxes, classes, valid, np.array(rows, np.float32).reshape(-1, 6)


# ----------------------------------------------------------------------------------------------------------------
# The reference's way: per image, dynamic shapes, eager (written from the super-gradients description).


def reference_style_loss(tf, outputs, targets, num_classes, no_grad):
  flat, grids, level_strides = [], [], []
  for out, s in zip(outputs, STRIDES):
    b, h, w, d = out.shape
    ys, xs = tf.meshgrid(tf.range(h, dtype=tf.float32), tf.range(w, dtype=tf.float32), indexing="ij")
    grid = tf.reshape(tf.stack([xs, ys], -1), [1, h * w, 2])
    raveled = tf.reshape(out, [b, h * w, d])
    flat.append(tf.concat([(raveled[..., :2] + grid) * s, tf.exp(raveled[..., 2:4]) * s, raveled[..., 4:]], -1))
    grids.append(grid[0])
    level_strides.append(tf.fill([h * w], float(s)))
  preds = tf.concat(flat, 1)  # [B, A, 5 + C]
  grid = tf.concat(grids, 0)
  strides = tf.concat(level_strides, 0)
  num_anchors = preds.shape[1]
  xc = grid[:, 0] * strides + 0.5 * strides
  yc = grid[:, 1] * strides + 0.5 * strides
  fg_masks, reg_targets, cls_targets, num_fg = [], [], [], 0
  for image in range(preds.shape[0]):
    labels = tf.boolean_mask(targets, targets[:, 0] == image)
    n = labels.shape[0]
    if n == 0:
      fg_masks.append(tf.zeros([num_anchors], tf.bool))
      continue
    with no_grad():  # the reference assigns under torch.no_grad()
      gt = labels[:, 2:6]
      l, r = gt[:, 0:1] - 0.5 * gt[:, 2:3], gt[:, 0:1] + 0.5 * gt[:, 2:3]
      t, btm = gt[:, 1:2] - 0.5 * gt[:, 3:4], gt[:, 1:2] + 0.5 * gt[:, 3:4]
      in_box = tf.reduce_min(tf.stack([xc - l, r - xc, yc - t, btm - yc], 2), -1) > 0  # [n, A]
      rad = 2.5 * strides
      in_ctr = tf.reduce_min(tf.stack([xc - (gt[:, 0:1] - rad), gt[:, 0:1] + rad - xc, yc - (gt[:, 1:2] - rad),
                                       gt[:, 1:2] + rad - yc], 2), -1) > 0
      candidate = tf.reduce_any(in_box, 0) | tf.reduce_any(in_ctr, 0)  # [A]
      strong = tf.boolean_mask(in_box, candidate, axis=1) & tf.boolean_mask(in_ctr, candidate, axis=1)  # [n, Mc]
      cand = tf.boolean_mask(preds[image], candidate)  # [Mc, 5 + C]
      mc = cand.shape[0]
      g1, g2 = gt[:, None, :2] - gt[:, None, 2:] / 2, gt[:, None, :2] + gt[:, None, 2:] / 2
      p1, p2 = cand[None, :, :2] - cand[None, :, 2:4] / 2, cand[None, :, :2] + cand[None, :, 2:4] / 2
      inter = tf.reduce_prod(tf.maximum(tf.minimum(g2, p2) - tf.maximum(g1, p1), 0.0), -1)
      ious = inter / (tf.reduce_prod(g2 - g1, -1) + tf.reduce_prod(p2 - p1, -1) - inter + 1e-9)  # [n, Mc]
      onehot = tf.tile(tf.one_hot(tf.cast(labels[:, 1], tf.int32), num_classes)[:, None], [1, mc, 1])  # [n, Mc, C]
      q = tf.sqrt(tf.tile(tf.sigmoid(cand[None, :, 5:]) * tf.sigmoid(cand[None, :, 4:5]), [n, 1, 1]))
      bce = -(onehot * tf.maximum(tf.math.log(q), -100.0) + (1 - onehot) * tf.maximum(tf.math.log(1 - q), -100.0))
      cost = (tf.reduce_sum(bce, -1) + 3.0 * -tf.math.log(ious + 1e-8)
              + 100000.0 * tf.cast(~strong, tf.float32))
      ks = tf.maximum(tf.cast(tf.reduce_sum(tf.math.top_k(ious, min(10, mc)).values, 1), tf.int32), 1).numpy()
      picks = [tf.stack([tf.fill([k], g), tf.math.top_k(-cost[g], k=int(k)).indices], 1) for g, k in enumerate(ks)]
      matching = tf.scatter_nd(tf.concat(picks, 0), tf.ones([int(ks.sum())], tf.int32), [n, mc])
      shared = tf.reduce_sum(matching, 0) > 1
      if tf.reduce_any(shared):
        winner = tf.one_hot(tf.argmin(cost, 0), n, axis=0, dtype=tf.int32)
        matching = tf.where(shared[None], winner, matching)
      fg_in_cand = tf.reduce_sum(matching, 0) > 0
      fg_masks.append(tf.scatter_nd(tf.where(candidate), fg_in_cand, [num_anchors]))
      matched = tf.argmax(tf.boolean_mask(matching, fg_in_cand, axis=1), 0)
      num_fg += int(tf.reduce_sum(tf.cast(fg_in_cand, tf.int32)))
      matched_iou = tf.boolean_mask(tf.reduce_sum(tf.cast(matching, tf.float32) * ious, 0), fg_in_cand)
    reg_targets.append(tf.gather(gt, matched))
    cls_targets.append(tf.one_hot(tf.gather(tf.cast(labels[:, 1], tf.int32), matched), num_classes)
                       * matched_iou[:, None])
  fg = tf.concat(fg_masks, 0)
  flat_preds = tf.reshape(preds, [-1, preds.shape[-1]])
  fg_preds = tf.boolean_mask(flat_preds, fg)
  num_fg = max(num_fg, 1)
  if reg_targets:
    reg, cls_t = tf.concat(reg_targets, 0), tf.concat(cls_targets, 0)
    p, g = fg_preds[:, :4], reg
    tl = tf.maximum(p[:, :2] - p[:, 2:] / 2, g[:, :2] - g[:, 2:] / 2)
    br = tf.minimum(p[:, :2] + p[:, 2:] / 2, g[:, :2] + g[:, 2:] / 2)
    area_i = tf.reduce_prod(br - tl, 1) * tf.cast(tf.reduce_all(tl < br, 1), tf.float32)
    iou = area_i / (tf.reduce_prod(p[:, 2:], 1) + tf.reduce_prod(g[:, 2:], 1) - area_i + 1e-16)
    loss_iou = tf.reduce_sum(1 - iou ** 2) / num_fg
    loss_cls = tf.reduce_sum(tf.nn.sigmoid_cross_entropy_with_logits(labels=cls_t, logits=fg_preds[:, 5:])) / num_fg
  else:
    loss_iou = loss_cls = 0.0
  loss_obj = tf.reduce_sum(tf.nn.sigmoid_cross_entropy_with_logits(
      labels=tf.cast(fg, tf.float32), logits=flat_preds[:, 4])) / num_fg
  return 5.0 * loss_iou + loss_obj + loss_cls, num_fg


# ----------------------------------------------------------------------------------------------------------------


def _xla_temp_bytes(dump_dir):
  """Largest preallocated temp buffer among the XLA programs dumped to `dump_dir` (their exact working memory)."""
  sizes = [0]
  for name in glob.glob(os.path.join(dump_dir, "*buffer-assignment.txt")):
    with open(name) as f:
      sizes += [int(m) for m in re.findall(r"allocation \d+: size (\d+), preallocated-temp", f.read())]
  return max(sizes)


def child(args):
  dump_dir = tempfile.mkdtemp(prefix="simota_xla_dump_")
  if args.mode == "xla":
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_dump_to={dump_dir} --xla_dump_hlo_as_text"
  import tensorflow as tf

  from tfreward.losses import yolox

  outputs, boxes, classes, valid, rows = make_problem(args.batch, args.size, args.classes, args.max_objects)
  outputs = [tf.constant(o) for o in outputs]
  if args.mode == "xla":
    def step(outs):
      with tf.GradientTape() as tape:
        tape.watch(outs)
        result = yolox.yolox_loss(outs, boxes, classes, valid, num_classes=args.classes)
      grads = tape.gradient(result["total"], outs) if args.grad else []  # XLA prunes the unused tape
      return result["total"], tf.reduce_sum(tf.cast(result["fg_mask"], tf.int32)), grads

    compiled = tf.function(step, jit_compile=True)
    run = lambda: [x.numpy() if hasattr(x, "numpy") else x for x in compiled(outputs)[:2]]  # noqa: E731
  else:
    targets = tf.constant(rows)

    def run():
      if not args.grad:
        total, num_fg = reference_style_loss(tf, outputs, targets, args.classes, contextlib.nullcontext)
        return total.numpy(), num_fg
      with tf.GradientTape() as tape:
        tape.watch(outputs)
        total, num_fg = reference_style_loss(tf, outputs, targets, args.classes, tape.stop_recording)
      [g.numpy() for g in tape.gradient(total, outputs)]
      return total.numpy(), num_fg

  start = time.perf_counter()
  total, num_fg = run()  # warm-up: XLA compilation, first eager kernels
  first = time.perf_counter() - start
  device = "CPU:0"
  resident = tf.config.experimental.get_memory_info(device)["current"]  # inputs and cached constants
  tf.config.experimental.reset_memory_stats(device)
  times = []
  for _ in range(args.repeats):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  peak = tf.config.experimental.get_memory_info(device)["peak"] - resident
  temp = _xla_temp_bytes(dump_dir)
  shutil.rmtree(dump_dir, ignore_errors=True)
  print(json.dumps({"mode": args.mode, "first_call_s": first, "median_s": statistics.median(times),
                    "peak_mb": peak / 2**20, "xla_temp_mb": temp / 2**20, "total": float(total),
                    "num_fg": int(num_fg)}))


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--size", type=int, default=640)
  parser.add_argument("--classes", type=int, default=80)
  parser.add_argument("--max-objects", type=int, default=100)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--grad", action="store_true", help="also compute the gradient w.r.t. the head outputs")
  parser.add_argument("--mode", choices=("xla", "reference"), help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.size % 32:
    raise ValueError(f"--size must be a multiple of 32, got {args.size}.")
  if args.mode:
    return child(args)
  results = {}
  for mode in ("xla", "reference"):
    cmd = [sys.executable, __file__, "--mode", mode] + sys.argv[1:]
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
           "TF_CPU_ALLOCATOR_USE_BFC": "true"}  # the BFC allocator keeps peak statistics (XLA allocates through it)
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
  x, r = results["xla"], results["reference"]
  anchors = sum((args.size // s) ** 2 for s in STRIDES)
  print(f"B={args.batch}, {args.size}x{args.size} ({anchors} anchors), {args.classes} classes, "
        f"{args.max_objects} slots, {'forward + gradient' if args.grad else 'forward'}, "
        f"median of {args.repeats}, {os.cpu_count()} CPU cores")
  print(f"{'':28}{'tfreward XLA batched':>22}{'reference-style eager':>24}{'ratio ref/xla':>15}")
  print(f"{'time per batch (s)':28}{x['median_s']:>22.3f}{r['median_s']:>24.3f}{r['median_s'] / x['median_s']:>15.1f}")
  mem_ratio = f"{r['peak_mb'] / x['peak_mb']:.2f}" if min(x["peak_mb"], r["peak_mb"]) >= 1 else "-"
  print(f"{'peak tensor memory (MB)':28}{x['peak_mb']:>22.0f}{r['peak_mb']:>24.0f}{mem_ratio:>15}")
  print(f"{'XLA temp buffer (MB)':28}{x['xla_temp_mb']:>22.0f}{'-':>24}")
  print(f"{'first call incl. compile (s)':28}{x['first_call_s']:>22.2f}{r['first_call_s']:>24.2f}")
  rel = abs(x["total"] - r["total"]) / max(abs(r["total"]), 1e-12)
  print(f"{'total loss':28}{x['total']:>22.6f}{r['total']:>24.6f}{'diff %.0e' % rel:>15}")
  print(f"{'foreground anchors':28}{x['num_fg']:>22d}{r['num_fg']:>24d}")


if __name__ == "__main__":
  main()
