"""Detection reward per batch: tfreward (TensorFlow, XLA) beside the reference (big_vision's JAX `reward_fn`, jitted).

The reference is `big_vision/configs/proj/reward_tune/detection_reward.py` of google-research/big_vision (the module
of seed 000), loaded from a checkout by file path and run by a Python that has JAX and einops, in its own process:

  git clone https://github.com/google-research/big_vision /tmp/big_vision
  python -m venv /tmp/jaxenv && /tmp/jaxenv/bin/pip install jax jaxlib einops
  python bench/detection_reward.py --big-vision /tmp/big_vision --reference-python /tmp/jaxenv/bin/python

Without `--big-vision` only tfreward runs. Workloads (paper config: 1000 bins, 80 classes, 10 IoU thresholds):
  (a) B = 32 images x N = 8 samples x 100 box slots (ground truth: 100 slots);
  (b) B = 8 x N = 4 x 100 slots.
Ground truth: 1-100 objects per image (more small counts than large). Samples overlap it the way a model's do:
jittered copies of ground-truth boxes, exact duplicates, copies with a flipped class, random boxes, then padding.

Timing: median of `--repeats` calls after a warm-up (compilation not counted); both sides jitted, outputs fetched
to the host each call. Memory: the compiled program's temp buffer (TF: from XLA's buffer assignment dump; JAX:
`compiled.memory_analysis()`), i.e. the working memory beyond inputs and outputs. Rewards are compared with
tfreward's `legacy_threshold_keys=True` (the reference's mean; timing uses the default mean, same cost).
"""

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import types

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from xla_memory import xla_temp_bytes  # noqa: E402  (bench/ is on the path of a script run from it)

MAX_LEVEL, MAX_CONF, NUM_CLS = 1000, 2, 80
WORKLOADS = {"a": (32, 8, 100), "b": (8, 4, 100)}  # batch, samples, box slots


def _tokens(boxes, classes):
  """[..., K, 4] bins, [..., K] class ids -> [..., K, 6] tokens with conf 1 (the present ones)."""
  coords = boxes + MAX_CONF + 1
  cls = classes + MAX_CONF + 1 + MAX_LEVEL + 1
  return np.concatenate([coords, cls[..., None], np.ones_like(cls)[..., None]], -1)


def make_problem(batch, samples, slots, seed=0):
  """Token sequences: seqs_pred [B, N, 6 * slots], seqs_gt [B, 6 * slots] int32 (padding slots are all 0)."""
  rng = np.random.default_rng(seed)

  def random_boxes(n):
    size = np.exp(rng.uniform(np.log(20), np.log(600), size=(n, 2)))
    lo = rng.uniform(0, MAX_LEVEL - size)
    return np.round(np.concatenate([lo, lo + size], -1)).astype(np.int64)[:, [0, 1, 2, 3]]

  gt = np.zeros((batch, slots, 6), np.int64)
  pred = np.zeros((batch, samples, slots, 6), np.int64)
  for b in range(batch):
    count = int(np.clip(rng.geometric(1 / 25), 1, slots))
    gt_boxes, gt_cls = random_boxes(count), rng.integers(0, NUM_CLS, count)
    gt[b, :count] = _tokens(gt_boxes, gt_cls)
    for n in range(samples):
      emitted = int(np.clip(count + rng.integers(-count // 3 - 1, count // 3 + 2), 1, slots))
      src = rng.integers(0, count, emitted)
      kind = rng.random(emitted)
      boxes = gt_boxes[src] + np.round(rng.normal(0, 0.04, (emitted, 4)) * (gt_boxes[src, 2:] - gt_boxes[src, :2])[:, [0, 1, 0, 1]])
      boxes = np.where((kind < 0.15)[:, None], gt_boxes[src], boxes)  # exact duplicates / copies
      cls = np.where((kind >= 0.15) & (kind < 0.25), rng.integers(0, NUM_CLS, emitted), gt_cls[src])  # flipped
      noise = kind >= 0.9
      boxes[noise] = random_boxes(int(noise.sum()))
      pred[b, n, :emitted] = _tokens(np.clip(boxes, 0, MAX_LEVEL), cls)
  return pred.reshape(batch, samples, slots * 6).astype(np.int32), gt.reshape(batch, slots * 6).astype(np.int32)


def _timed(run, repeats):
  start = time.perf_counter()
  out = run()
  first = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  return out, first, times


def child_tfreward(args, pred, gt):
  dump_dir = tempfile.mkdtemp(prefix="reward_xla_dump_")
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_dump_to={dump_dir} --xla_dump_hlo_as_text"
  import tensorflow as tf

  from tfreward.rewards import detection

  pred, gt = tf.constant(pred), tf.constant(gt)
  timed = tf.function(lambda p, g: detection.detection_reward(p, g)[0], jit_compile=True)
  legacy = tf.function(lambda p, g: detection.detection_reward(p, g, legacy_threshold_keys=True)[0],
                       jit_compile=True)
  reward = legacy(pred, gt).numpy()
  _, first, times = _timed(lambda: timed(pred, gt).numpy(), args.repeats)
  temp = xla_temp_bytes(dump_dir)
  shutil.rmtree(dump_dir, ignore_errors=True)
  return reward, first, times, temp


def child_reference(args, pred, gt):
  import jax
  import jax.numpy as jnp

  path = os.path.join(args.big_vision, "big_vision", "configs", "proj", "reward_tune", "detection_reward.py")
  spec = importlib.util.spec_from_file_location("bv_detection_reward", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = types.SimpleNamespace(max_level=MAX_LEVEL, max_conf=MAX_CONF, num_cls=NUM_CLS, nms_w=0.3,
                                 cls_smooth=0.05, correct_thr=0.5,
                                 reward_thr=(0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95))
  fn = jax.jit(lambda p, g: module.reward_fn(p, g, config)[0])
  pred, gt = jnp.asarray(pred), jnp.asarray(gt)
  temp = fn.lower(pred, gt).compile().memory_analysis().temp_size_in_bytes
  reward, first, times = _timed(lambda: np.asarray(fn(pred, gt)), args.repeats)
  return reward, first, times, temp


def child(args):
  batch, samples, slots = WORKLOADS[args.workload]
  pred, gt = make_problem(batch, samples, slots)
  run = child_tfreward if args.side == "tfreward" else child_reference
  reward, first, times, temp = run(args, pred, gt)
  print(json.dumps({"median_s": statistics.median(times), "fastest_s": min(times), "first_s": first,
                    "temp_mb": temp / 2**20, "reward": np.asarray(reward, np.float64).tolist()}))


def _run_child(python, args, side, workload):
  cmd = [python, os.path.abspath(__file__), "--side", side, "--workload", workload, "--repeats", str(args.repeats)]
  if args.big_vision:
    cmd += ["--big-vision", args.big_vision]
  env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
  out = subprocess.run(cmd, capture_output=True, text=True, env=env)
  if out.returncode:
    raise RuntimeError(f"{side} child failed:\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--big-vision", help="a google-research/big_vision checkout (the reference); optional")
  parser.add_argument("--reference-python", default=sys.executable, help="a Python with jax and einops")
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--side", choices=("tfreward", "reference"), help=argparse.SUPPRESS)
  parser.add_argument("--workload", choices=tuple(WORKLOADS), help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.side:
    return child(args)
  print(f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f}; medians of {args.repeats} calls "
        "(fastest in brackets), compiled program temp memory")
  print("| workload | tfreward (XLA) | big_vision (JAX jit) | tfreward / reference | temp MB tfreward / reference "
        "| max abs reward diff |")
  print("|---|---|---|---|---|---|")
  for workload, (batch, samples, slots) in WORKLOADS.items():
    ours = _run_child(sys.executable, args, "tfreward", workload)
    ref = _run_child(args.reference_python, args, "reference", workload) if args.big_vision else None
    name = f"({workload}) B={batch} x N={samples} x {slots} boxes"
    mine = f"{ours['median_s'] * 1e3:.1f} ms ({ours['fastest_s'] * 1e3:.1f})"
    if ref is None:
      print(f"| {name} | {mine} | not run (--big-vision) | - | {ours['temp_mb']:.1f} / - | - |")
      continue
    diff = np.max(np.abs(np.asarray(ours["reward"]) - np.asarray(ref["reward"])))
    print(f"| {name} | {mine} | {ref['median_s'] * 1e3:.1f} ms ({ref['fastest_s'] * 1e3:.1f}) "
          f"| {ours['median_s'] / ref['median_s']:.2f} | {ours['temp_mb']:.1f} / {ref['temp_mb']:.1f} "
          f"| {diff:.1e} |")


if __name__ == "__main__":
  main()
