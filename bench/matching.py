"""Benchmark: tfreward's in-graph exact matcher (XLA) vs scipy on the host vs Model Garden's in-graph matcher.

Run from the repository root (CPU):

  python bench/matching.py

Workloads:
  (a) Group DETR: batch 8 x 11 groups x 300 queries per group, targets per image drawn from a COCO-like
      distribution (negative binomial, mean about 7, clipped at 50) padded to 100; DETR matching costs from random
      predictions. 88 problems of [100 padded rows, 300 columns]. Timed over several random batches.
  (b) Square: a batch of two 300 x 300 problems with uniform random costs.

Columns: milliseconds per call (median), for this matcher compiled with XLA, `scipy.optimize.linear_sum_assignment`
looping over the problems on the host (valid rows only), and `official.projects.detr.ops.matchers.
hungarian_matching` (tf-models-official, optional; square problems only, so (a) is padded to 300 x 300) compiled
with XLA. It prints "not installed" when `official` cannot be imported.

(a) is also timed as in a training step: from the predictions, the DETR cost and the matching in one compiled call,
against the cost compiled, copied to the host and solved by scipy per image and group (DETR's `HungarianMatcher`).

Peak memory of one call: for tfreward, the peak of TensorFlow's CPU allocator (BFC, TF_CPU_ALLOCATOR_USE_BFC=true)
above what was in use before the call (the compiled program's temporaries and outputs), measured in a child process
so that the allocator setting does not touch the timings; for scipy, the tracemalloc peak of the host loop (the
copied valid rows and scipy's work arrays).
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import tracemalloc

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import scipy.optimize  # noqa: E402
import tensorflow as tf  # noqa: E402

from tfreward.losses import detr_matcher  # noqa: E402
from tfreward.ops import boxes as box_ops  # noqa: E402
from tfreward.ops import matching  # noqa: E402

try:  # Optional: tf-models-official (the `garden` extra).
  from official.projects.detr.ops import matchers as garden_matchers  # noqa: E402
except ImportError:  # pragma: no cover - depends on the environment
  garden_matchers = None


GROUPS = 11  # Group DETR's K


def coco_like_counts(rng, batch, *, mean=7.0, dispersion=1.2, max_targets=50):
  """Targets per image: negative binomial with the given mean (long tail like COCO), clipped to `max_targets`."""
  p = dispersion / (dispersion + mean)
  return np.minimum(rng.negative_binomial(dispersion, p, size=batch), max_targets)


def detr_inputs(rng, *, batch=8, groups=GROUPS, queries=300, padded=100, classes=91):
  """Random Group DETR predictions and COCO-like targets: logits [B, G*Q, classes], boxes [B, G*Q, 4] cxcywh,
  gt_boxes [B, T, 4] cxcywh, gt_classes [B, T] int32, gt_valid [B, T] bool (numpy), and the counts [B]."""
  counts = coco_like_counts(rng, batch)
  logits = rng.normal(-2.0, 1.5, size=(batch, groups * queries, classes)).astype(np.float32)
  boxes = (1.0 / (1.0 + np.exp(-rng.normal(0.0, 1.5, size=(batch, groups * queries, 4))))).astype(np.float32)
  yx_min = rng.uniform(0.0, 0.8, size=(batch, padded, 2))
  yx_max = np.minimum(yx_min + rng.uniform(0.02, 0.5, size=(batch, padded, 2)), 1.0)
  gt_yxyx = np.concatenate([yx_min, yx_max], axis=-1).astype(np.float32)
  gt_boxes = box_ops.yxyx_to_cxcywh(gt_yxyx).numpy()
  gt_classes = rng.integers(0, classes, size=(batch, padded)).astype(np.int32)
  valid = np.arange(padded)[None, :] < counts[:, None]
  return (logits, boxes, gt_boxes, gt_classes, valid), counts


def group_costs(logits, boxes, gt_boxes, gt_classes, groups=GROUPS):
  """DETR matching costs split into groups: [B, G, T, Q] (the matcher's input in `group_detr_loss`)."""
  cost = detr_matcher.matching_cost(logits, boxes, gt_boxes, gt_classes)  # [B, T, G*Q]
  batch, padded = cost.shape[0], cost.shape[1]
  return tf.transpose(tf.reshape(cost, [batch, padded, groups, -1]), [0, 2, 1, 3])


def detr_costs(rng):
  """Group DETR matching costs of random predictions: [B, G, T, Q] float32, [B, G, T] bool, the counts [B] and
  the inputs they were computed from (`detr_inputs`)."""
  inputs, counts = detr_inputs(rng)
  cost = group_costs(*inputs[:4]).numpy()
  valid = inputs[4]
  return (np.ascontiguousarray(cost), np.broadcast_to(valid[:, None, :], cost.shape[:3]).copy(), counts, inputs)


def time_ms(fn, repeats):
  """Median and fastest wall time of `repeats` calls after one warm-up call, in milliseconds."""
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(1e3 * (time.perf_counter() - start))
  return statistics.median(times), min(times)


def scipy_solve(cost, valid):
  flat_cost = cost.reshape(-1, *cost.shape[-2:])
  flat_valid = valid.reshape(-1, cost.shape[-2])
  out = []
  for c, v in zip(flat_cost, flat_valid):
    out.append(scipy.optimize.linear_sum_assignment(c[v]))
  return out


def check_optimal(cost, valid, assignment):
  """Largest relative gap between this matcher's total cost and scipy's, over all problems."""
  flat_cost = cost.reshape(-1, *cost.shape[-2:]).astype(np.float64)
  flat_valid = valid.reshape(-1, cost.shape[-2])
  flat_assign = assignment.reshape(flat_valid.shape)
  worst = 0.0
  for c, v, a in zip(flat_cost, flat_valid, flat_assign):
    rows = np.nonzero(v)[0]
    r, col = scipy.optimize.linear_sum_assignment(c[rows])
    ref = c[rows][r, col].sum()
    got = c[rows, a[rows]].sum()
    worst = max(worst, abs(got - ref) / max(1.0, abs(ref)))
  return worst


def run_ours(cost, valid, repeats):
  fn = tf.function(matching.linear_sum_assignment_with_trips, jit_compile=True)
  cost_t, valid_t = tf.constant(cost), tf.constant(valid)
  assignment, trips = fn(cost_t, valid_t)  # compile
  times = time_ms(lambda: fn(cost_t, valid_t)[0].numpy(), repeats)
  return times, tuple(int(t) for t in trips.numpy()), assignment.numpy()


def run_interleaved(batches, repeats):
  """Both matchers on every batch in turn, `repeats` rounds: [batch][call] ms for tfreward and for scipy.

  Each call meets the caches the other batches (10 MB of costs each) and the other matcher left, as a matcher
  inside a training loop does; repeating one batch back to back (`run_ours`, `time_ms`) keeps its rows cached.
  """
  fn = tf.function(matching.linear_sum_assignment, jit_compile=True)
  inputs = [(tf.constant(cost), tf.constant(valid)) for cost, valid, *_ in batches]
  for (cost, valid, *_), x in zip(batches, inputs):
    fn(*x).numpy()
    scipy_solve(cost, valid)
  ours, scipy_times = [[] for _ in batches], [[] for _ in batches]
  for _ in range(repeats):
    for i, ((cost, valid, *_), x) in enumerate(zip(batches, inputs)):
      start = time.perf_counter()
      fn(*x).numpy()
      ours[i].append(1e3 * (time.perf_counter() - start))
      start = time.perf_counter()
      scipy_solve(cost, valid)
      scipy_times[i].append(1e3 * (time.perf_counter() - start))
  return ours, scipy_times


def run_in_step(batches, repeats):
  """(a) as in a training step: from the predictions to the matched query of every target, in one call each.

  tfreward: the DETR cost and the matching in one compiled program (as inside `group_detr_loss`). Reference
  style (DETR's `HungarianMatcher`): the cost in a compiled program, copied to the host, scipy per image and group.
  Both pay one Python -> XLA call. Interleaved as `run_interleaved`. Returns [call] ms for each side and the
  largest relative gap between their total matching costs.
  """
  def ours(logits, boxes, gt_boxes, gt_classes, gt_valid):
    cost = detr_matcher.matching_cost(logits, boxes, gt_boxes, gt_classes)
    query_index = detr_matcher.group_match(cost, gt_valid, num_groups=GROUPS)
    return tf.reduce_sum(detr_matcher.matched_cost(logits, boxes, gt_boxes, gt_classes, query_index), axis=-1)

  ours_fn = tf.function(ours, jit_compile=True)
  cost_fn = tf.function(group_costs, jit_compile=True)

  def reference(x, gt_valid):
    cost = cost_fn(*x).numpy()  # [B, G, T, Q]
    totals = []
    for image_cost, valid in zip(cost, gt_valid):
      for group_cost in image_cost:
        rows_cost = group_cost[valid]
        rows, cols = scipy.optimize.linear_sum_assignment(rows_cost)
        totals.append(rows_cost[rows, cols].sum())
    return np.array(totals)

  inputs = [[tf.constant(x) for x in batch[3]] for batch in batches]
  worst = 0.0
  for x, batch in zip(inputs, batches):
    got = ours_fn(*x).numpy().reshape(-1)
    ref = reference(x[:4], batch[3][4])
    worst = max(worst, float(np.max(np.abs(got - ref) / np.maximum(1.0, np.abs(ref)))))
  ours_times, ref_times = [], []
  for _ in range(repeats):
    for x, batch in zip(inputs, batches):
      start = time.perf_counter()
      ours_fn(*x).numpy()
      ours_times.append(1e3 * (time.perf_counter() - start))
      start = time.perf_counter()
      reference(x[:4], batch[3][4])
      ref_times.append(1e3 * (time.perf_counter() - start))
  return ours_times, ref_times, worst


def run_dispatch(cost, valid, repeats):
  """A compiled call that only reads one entry: the fixed cost of calling any XLA function from Python."""
  fn = tf.function(lambda c, v: c[..., 0, 0] + tf.cast(v[..., 0], tf.float32), jit_compile=True)
  cost_t, valid_t = tf.constant(cost), tf.constant(valid)
  fn(cost_t, valid_t)
  return time_ms(lambda: fn(cost_t, valid_t).numpy(), repeats)


def run_garden(square_cost, repeats):
  if garden_matchers is None:
    return None
  fn = tf.function(lambda w: garden_matchers.hungarian_matching(w)[1], jit_compile=True)
  weights = tf.constant(square_cost)
  fn(weights).numpy()  # compile
  return time_ms(lambda: fn(weights).numpy(), repeats)[0]


def pad_square(cost, valid):
  """[..., R, C] with padding rows -> [P, C, C] square problems whose extra rows cost 0 everywhere."""
  flat_cost = cost.reshape(-1, *cost.shape[-2:])
  flat_valid = valid.reshape(-1, cost.shape[-2])
  num_cols = cost.shape[-1]
  square = np.zeros((flat_cost.shape[0], num_cols, num_cols), np.float32)
  square[:, :cost.shape[-2]] = np.where(flat_valid[..., None], flat_cost, 0.0)
  return square


def fmt(value, unit="ms"):
  return "not installed" if value is None else f"{value:.2f} {unit}"


def workloads(seed, batches):
  """The (a) batches and the (b) problems, the same for a given seed."""
  rng = np.random.default_rng(seed)
  batches_a = [detr_costs(rng) for _ in range(batches)]
  cost_b = rng.random((2, 300, 300)).astype(np.float32)
  return batches_a, (cost_b, np.ones((2, 300), bool))


def tf_peak_bytes(cost, valid):
  """Peak bytes of TF's BFC CPU allocator above its use before one call (needs TF_CPU_ALLOCATOR_USE_BFC=true)."""
  fn = tf.function(matching.linear_sum_assignment, jit_compile=True)
  cost_t, valid_t = tf.constant(cost), tf.constant(valid)
  fn(cost_t, valid_t).numpy()
  tf.config.experimental.reset_memory_stats("CPU:0")
  before = tf.config.experimental.get_memory_info("CPU:0")["current"]
  fn(cost_t, valid_t).numpy()
  return tf.config.experimental.get_memory_info("CPU:0")["peak"] - before


def scipy_peak_bytes(cost, valid):
  """tracemalloc peak of one host loop over the problems."""
  tracemalloc.start()
  scipy_solve(cost, valid)
  peak = tracemalloc.get_traced_memory()[1]
  tracemalloc.stop()
  return peak


def tf_memory(seed):
  """Runs this script in a child process with the BFC allocator: {"a": bytes, "b": bytes} (first (a) batch)."""
  env = dict(os.environ, TF_CPU_ALLOCATOR_USE_BFC="true")
  out = subprocess.run([sys.executable, __file__, "--memory-child", "--seed", str(seed)], env=env, check=True,
                       capture_output=True, text=True).stdout
  return json.loads(out.strip().splitlines()[-1])


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batches", type=int, default=10, help="random Group DETR batches for (a)")
  parser.add_argument("--repeats", type=int, default=20, help="timed calls per batch (median)")
  parser.add_argument("--garden-repeats", type=int, default=1, help="timed calls of the Model Garden matcher")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  batches_a, (cost_b, valid_b) = workloads(args.seed, args.batches)
  if args.memory_child:
    print(json.dumps({"a": tf_peak_bytes(*batches_a[0][:2]), "b": tf_peak_bytes(cost_b, valid_b)}))
    return
  load_start = os.getloadavg()

  print(f"TensorFlow {tf.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores; "
        f"garden: {'installed' if garden_matchers is not None else 'not installed'}")

  # (a) Group DETR workload.
  ours, scipy_times, trips, max_rows, worst = [], [], [], [], 0.0
  garden_a = None
  for i, (cost, valid, counts, _) in enumerate(batches_a):
    times, n_trips, assignment = run_ours(cost, valid, args.repeats)
    worst = max(worst, check_optimal(cost, valid, assignment))
    ours.append(times)
    trips.append(n_trips)
    max_rows.append(int(counts.max()))
    scipy_times.append(time_ms(lambda: scipy_solve(cost, valid), args.repeats))
    if i == 0:
      dispatch_a = run_dispatch(cost, valid, args.repeats)
      garden_a = run_garden(pad_square(cost, valid), args.garden_repeats)
  ours_a = statistics.median(t[0] for t in ours)
  scipy_a = statistics.median(t[0] for t in scipy_times)
  mixed_ours, mixed_scipy = run_interleaved(batches_a, args.repeats)
  mixed_ours_a = statistics.median(t for calls in mixed_ours for t in calls)
  mixed_scipy_a = statistics.median(t for calls in mixed_scipy for t in calls)
  step_ours, step_ref, step_gap = run_in_step(batches_a, args.repeats)

  # (b) Square 2 x 300 x 300.
  (ours_b, fastest_b), trips_b, assignment_b = run_ours(cost_b, valid_b, args.repeats)
  worst = max(worst, check_optimal(cost_b, valid_b, assignment_b))
  scipy_b, scipy_fastest_b = time_ms(lambda: scipy_solve(cost_b, valid_b), args.repeats)
  garden_b = run_garden(cost_b, args.garden_repeats)
  memory = tf_memory(args.seed)
  scipy_memory = {"a": scipy_peak_bytes(*batches_a[0][:2]), "b": scipy_peak_bytes(cost_b, valid_b)}
  load_end = os.getloadavg()

  print()
  print(f"Median ms per call ({args.repeats} calls after a warm-up; (a): median over {args.batches} batches of the "
        f"per-batch medians); peak memory of one call ((a): first batch), tfreward: TF's BFC CPU allocator peak "
        f"above the bytes in use before the call, scipy: tracemalloc peak:")
  print()
  print("| workload | tfreward (XLA) | scipy (host loop) | tfreward / scipy | tfreward peak memory | scipy peak memory "
        "| Model Garden (XLA) | garden / tfreward |")
  print("|---|---|---|---|---|---|---|---|")
  for key, name, mine, sp, garden in (("a", "(a) Group DETR 8x11x[100, 300]", ours_a, scipy_a, garden_a),
                                      ("b", "(b) square 2x[300, 300]", ours_b, scipy_b, garden_b)):
    ratio = "n/a" if garden is None else f"{garden / mine:.0f}x"
    print(f"| {name} | {fmt(mine)} | {fmt(sp)} | {mine / sp:.2f} | {memory[key] / 2**20:.2f} MiB | "
          f"{scipy_memory[key] / 2**20:.2f} MiB | {fmt(garden)} | {ratio} |")
  print()
  print(f"Load average (1, 5, 15 min) at the start: {', '.join(f'{x:.2f}' for x in load_start)}; at the end: "
        f"{', '.join(f'{x:.2f}' for x in load_end)}.")
  print(f"(a) interleaved (each call on the next batch, tfreward then scipy, {args.repeats} rounds over the "
        f"{args.batches} batches): tfreward {mixed_ours_a:.2f} ms, scipy {mixed_scipy_a:.2f} ms, ratio "
        f"{mixed_ours_a / mixed_scipy_a:.2f} (the table's (a) row repeats each batch back to back).")
  print(f"(a) as in a training step (from the predictions: DETR cost and matching in one compiled call, against the "
        f"cost in a compiled call, copied to the host and solved by scipy per image and group, as DETR's "
        f"HungarianMatcher does; interleaved, {args.repeats} rounds): tfreward {statistics.median(step_ours):.2f} ms, "
        f"reference style {statistics.median(step_ref):.2f} ms, ratio "
        f"{statistics.median(step_ours) / statistics.median(step_ref):.2f}; largest relative gap between their "
        f"total matching costs {step_gap:.1e}.")
  print(f"Python -> XLA call overhead alone (a compiled call reading one entry of the same inputs), median / "
        f"fastest: {dispatch_a[0]:.2f} / {dispatch_a[1]:.2f} ms; inside a compiled train step it is not paid.")
  print(f"Fastest call: (a) tfreward {min(t[1] for t in ours):.2f} ms, scipy {min(t[1] for t in scipy_times):.2f} "
        f"ms; (b) tfreward {fastest_b:.2f} ms, scipy {scipy_fastest_b:.2f} ms.")
  print(f"(a) per batch (median ms): tfreward {' '.join(f'{t[0]:.2f}' for t in ours)}; "
        f"scipy {' '.join(f'{t[0]:.2f}' for t in scipy_times)}")
  print(f"(a) loop trips (greedy start + row reduction and searches) {', '.join(f'{g}+{n}' for g, n in trips)}; "
        f"largest image per batch {max_rows} targets; Model Garden timed on the first batch only.")
  print(f"(b) loop trips (greedy start + row reduction and searches) {trips_b[0]}+{trips_b[1]}.")
  print(f"Largest relative gap to scipy's optimal total cost: {worst:.1e}")


if __name__ == "__main__":
  main()
