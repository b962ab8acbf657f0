"""SimOTA assignment + YOLOX loss per batch, side by side in one run:

  tfreward exact / fast   tfreward's batched static-shape loss (`variant="exact"` / `"fast"`), one XLA program;
  super-gradients fast / exact   super-gradients' own `YoloXFastDetectionLoss` / `YoloXDetectionLoss` in PyTorch
      (2 threads), run by `--reference-python` (a Python with torch and super-gradients, see bench/simota_sg.py);
      "not installed" when that Python cannot import them;
  reference-style eager   the exact variant written the reference's way in eager TensorFlow (a loop over images with
      data-dependent shapes, a Python loop over objects with a per-object top-k).

Default problem: B = 8 images of 640 x 640 (8400 anchors), 80 classes, 100 object slots with 100, 100, 80, 60, 40,
20, 10 and 0 objects, built from one numpy seed by every side. Each side runs in its own subprocess, one after the
other; `--rounds N` repeats the sequence and reports medians over rounds (ratios are taken within each round, then
their median), which is what to trust on a shared machine.

Timing: after warm-up calls (XLA compilation, first eager kernels, PyTorch's allocator), the median of `--repeats`
calls. The ground truth enters the compiled tfreward step as arguments, as in training (not as constants XLA could
fold). Peak memory: TensorFlow sides, the BFC allocator's peak during the timed calls above what was allocated before
them (TF_CPU_ALLOCATOR_USE_BFC=true; XLA's buffers go through it too; BFC may hand out a chunk up to 2x larger than
requested, so an upper bound), and for XLA the compiled program's exact temp buffer; PyTorch, the growth of the
process's resident set over one call, sampled every 0.2 ms by a thread, in a second process whose glibc returns
freed blocks of 128 KiB or more to the system at once (see bench/simota_sg.py): the working memory of the call's
tensors (a lower bound: small blocks and peaks shorter than 0.2 ms are missed).

  python bench/simota.py --reference-python /work/scratch/refvenv/bin/python            # forward, about 3 minutes
  python bench/simota.py --reference-python /work/scratch/refvenv/bin/python --rounds 3
  python bench/simota.py --grad --repeats 3   # forward and gradient w.r.t. the head outputs
  python bench/simota.py --baseline /path/to/worktree/of/an/older/commit   # before/after in one run
"""

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from xla_memory import xla_temp_bytes  # noqa: E402  (bench/ is on the path of a script run from it)

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


def child(args):
  dump_dir = tempfile.mkdtemp(prefix="simota_xla_dump_")
  xla = args.mode.startswith("xla")
  if xla:
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_dump_to={dump_dir} --xla_dump_hlo_as_text"
  import tensorflow as tf

  from tfreward.losses import yolox

  outputs, boxes, classes, valid, rows = make_problem(args.batch, args.size, args.classes, args.max_objects)
  outputs = [tf.constant(o) for o in outputs]
  if xla:
    variant = args.mode.split("-")[1]
    ground_truth = (tf.constant(boxes), tf.constant(classes), tf.constant(valid))

    def step(outs, gt_boxes, gt_classes, gt_valid):
      with tf.GradientTape() as tape:
        tape.watch(outs)
        result = yolox.yolox_loss(outs, gt_boxes, gt_classes, gt_valid, num_classes=args.classes, variant=variant)
      grads = tape.gradient(result["total"], outs) if args.grad else []  # XLA prunes the unused tape
      return result["total"], tf.reduce_sum(tf.cast(result["fg_mask"], tf.int32)), grads

    compiled = tf.function(step, jit_compile=True)
    run = lambda: [x.numpy() for x in compiled(outputs, *ground_truth)[:2]]  # noqa: E731
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
  for _ in range(args.warmup - 1):
    run()
  device = "CPU:0"
  resident = tf.config.experimental.get_memory_info(device)["current"]  # inputs and cached constants
  tf.config.experimental.reset_memory_stats(device)
  times = []
  for _ in range(args.repeats):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  peak = tf.config.experimental.get_memory_info(device)["peak"] - resident
  temp = xla_temp_bytes(dump_dir)
  shutil.rmtree(dump_dir, ignore_errors=True)
  print(json.dumps({"mode": args.mode, "first_call_s": first, "median_s": statistics.median(times), "times_s": times,
                    "peak_mb": peak / 2**20, "xla_temp_mb": temp / 2**20 if xla else None, "total": float(total),
                    "num_fg": int(num_fg)}))


SIDES = ("xla-exact", "xla-fast", "base-exact", "base-fast", "sg_fast", "sg_exact", "reference")
TITLES = {"xla-exact": "tfreward exact", "xla-fast": "tfreward fast", "base-exact": "baseline exact",
          "base-fast": "baseline fast", "sg_fast": "super-gradients fast", "sg_exact": "super-gradients exact",
          "reference": "reference-style"}
NOTES = {"xla-exact": "XLA", "xla-fast": "XLA", "base-exact": "XLA, --baseline", "base-fast": "XLA, --baseline",
         "sg_fast": "PyTorch", "sg_exact": "PyTorch", "reference": "TF eager"}


SHORT = {"xla-exact": "tfr", "xla-fast": "tfr", "sg_fast": "s-g", "sg_exact": "s-g"}


def run_round(args):
  """Every side once, in its own subprocess: {side: result dict or {"error": ...}}."""
  here = os.path.dirname(os.path.abspath(__file__))
  problem = ["--batch", str(args.batch), "--size", str(args.size), "--classes", str(args.classes),
             "--max-objects", str(args.max_objects), "--repeats", str(args.repeats)] + (["--grad"] if args.grad else [])
  env = {**os.environ, "PYTHONPATH": os.path.dirname(here),
         "TF_CPU_ALLOCATOR_USE_BFC": "true"}  # the BFC allocator keeps peak statistics (XLA allocates through it)
  results = {}
  for side in ("xla-exact", "xla-fast") + (("base-exact", "base-fast") if args.baseline else ()):
    mode = side.replace("base-", "xla-")
    side_env = {**env, "PYTHONPATH": args.baseline} if side.startswith("base") else env
    out = subprocess.run([sys.executable, __file__, "--mode", mode, "--warmup", str(args.warmup)] + problem,
                         check=True, capture_output=True, text=True, env=side_env)
    results[side] = json.loads(out.stdout.strip().splitlines()[-1])
  reference_python = args.reference_python or sys.executable
  exact_repeats = str(min(args.repeats, args.exact_reference_repeats))
  for variant in ("fast", "exact"):
    cmd = [reference_python, os.path.join(here, "simota_sg.py"), "--variants", variant,
           "--warmup", str(args.warmup)] + problem
    if variant == "exact":
      cmd[cmd.index("--repeats") + 1] = exact_repeats
    try:
      sg_env = {**os.environ, "PYTHONWARNINGS": "ignore"}
      out = subprocess.run(cmd, capture_output=True, text=True, env=sg_env)
      lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
      results[f"sg_{variant}"] = lines[-1] if lines else {"error": f"failed: {out.stderr.strip()[-300:]}"}
      if lines and "error" not in lines[-1]:  # memory in a second process (see bench/simota_sg.py)
        out = subprocess.run(cmd + ["--memory"], capture_output=True, text=True, env=sg_env)
        memory = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
        results[f"sg_{variant}"]["peak_rss_mb"] = memory[-1].get("peak_rss_mb") if memory else None
    except OSError as error:
      results[f"sg_{variant}"] = {"error": f"not installed ({error})"}
  if not args.skip_reference_style:
    out = subprocess.run([sys.executable, __file__, "--mode", "reference", "--warmup", "1"] + problem,
                         check=True, capture_output=True, text=True, env=env)
    results["reference"] = json.loads(out.stdout.strip().splitlines()[-1])
  return results


def _cell(value, fmt, width):
  return f"{'-' if value is None else format(value, fmt):>{width}}"


def report(args, rounds):
  sides = [s for s in SIDES if s in rounds[0]]
  anchors = sum((args.size // s) ** 2 for s in STRIDES)
  med = lambda side, key: (statistics.median([r[side][key] for r in rounds])  # noqa: E731
                           if all(r[side].get(key) is not None and "error" not in r[side] for r in rounds) else None)
  print(f"B={args.batch}, {args.size}x{args.size} ({anchors} anchors), {args.classes} classes, "
        f"{args.max_objects} slots, {'forward + gradient' if args.grad else 'forward'}, median of {args.repeats} calls "
        f"(super-gradients exact: {min(args.repeats, args.exact_reference_repeats)}), {len(rounds)} round(s), "
        f"{os.cpu_count()} CPU cores, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
  width = 22
  print(f"{'':34}" + "".join(f"{TITLES[s]:>{width}}" for s in sides))
  print(f"{'':34}" + "".join(f"{NOTES[s]:>{width}}" for s in sides))
  errors = {s: rounds[0][s]["error"] for s in sides if "error" in rounds[0][s]}
  if errors:
    status = {s: ("not installed" if "not installed" in errors[s] else "failed") if s in errors else "" for s in sides}
    print(f"{'':34}" + "".join(f"{status[s]:>{width}}" for s in sides))

  def ratio(side, key="median_s"):
    if "error" in rounds[0]["sg_fast"] or "error" in rounds[0][side]:
      return None
    return statistics.median([r[side][key] / r["sg_fast"][key] for r in rounds])

  print(f"{'time per batch (s)':34}" + "".join(_cell(med(s, "median_s"), ".3f", width) for s in sides))
  if len(rounds) > 1:
    per_round = {s: "-" if "error" in rounds[0][s] else " ".join(f"{r[s]['median_s']:.3f}" for r in rounds)
                 for s in sides}
    print(f"{'  per round (s)':34}" + "".join(f"{per_round[s]:>{width}}" for s in sides))
  print(f"{'time / super-gradients fast':34}" + "".join(_cell(ratio(s), ".2f", width) for s in sides))
  print(f"{'first call (compile, warm-up) (s)':34}" + "".join(_cell(med(s, "first_call_s"), ".2f", width)
                                                               for s in sides))
  tf_side = lambda s: not s.startswith("sg")  # noqa: E731
  mem = {s: med(s, "peak_mb") if tf_side(s) else med(s, "peak_rss_mb") for s in sides}
  print(f"{'peak memory (MB)':34}" + "".join(_cell(mem[s], ".0f", width) for s in sides))
  how = {s: "BFC peak" if tf_side(s) else "RSS growth" for s in sides}
  print(f"{'  measured as':34}" + "".join(f"{how[s]:>{width}}" for s in sides))
  print(f"{'XLA temp buffer (MB)':34}" + "".join(_cell(med(s, "xla_temp_mb"), ".0f", width) for s in sides))
  print(f"{'total loss':34}" + "".join(_cell(med(s, "total"), ".6f", width) for s in sides))
  print(f"{'foreground anchors':34}" + "".join(_cell(med(s, "num_fg"), ".0f", width) for s in sides))
  # The same variant must give the same loss: each side against super-gradients' (or, without it, tfreward's).
  against = {"xla-exact": "sg_exact", "xla-fast": "sg_fast", "base-exact": "xla-exact", "base-fast": "xla-fast",
             "reference": "sg_exact", "sg_fast": "xla-fast", "sg_exact": "xla-exact"}

  def diff(side):
    other = against[side]
    if other not in rounds[0] or "error" in rounds[0][other] or "error" in rounds[0][side]:
      other = "xla-exact" if side == "reference" else None
    if other is None:
      return "-"
    a, b = rounds[0][side]["total"], rounds[0][other]["total"]
    return f"{abs(a - b) / max(abs(b), 1e-12):.1e} vs {SHORT[other]}"

  print(f"{'total: relative difference':34}" + "".join(f"{diff(s):>{width}}" for s in sides))


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--size", type=int, default=640)
  parser.add_argument("--classes", type=int, default=80)
  parser.add_argument("--max-objects", type=int, default=100)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--warmup", type=int, default=2, help="calls before timing (the first one compiles)")
  parser.add_argument("--rounds", type=int, default=1, help="run every side this many times, report medians")
  parser.add_argument("--exact-reference-repeats", type=int, default=3,
                      help="at most this many timed calls of super-gradients' exact loss (seconds each)")
  parser.add_argument("--grad", action="store_true", help="also compute the gradient w.r.t. the head outputs")
  parser.add_argument("--reference-python", help="a Python with torch and super-gradients (default: this one)")
  parser.add_argument("--skip-reference-style", action="store_true", help="leave out the eager TF rewrite")
  parser.add_argument("--baseline", help="another checkout's root (e.g. a `git worktree` of an older commit): its "
                      "tfreward runs too, in two more columns, for before/after in one run")
  parser.add_argument("--mode", choices=("xla-exact", "xla-fast", "reference"), help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.size % 32:
    raise ValueError(f"--size must be a multiple of 32, got {args.size}.")
  if args.mode:
    return child(args)
  report(args, [run_round(args) for _ in range(args.rounds)])


if __name__ == "__main__":
  main()
