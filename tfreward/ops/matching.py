"""Exact minimum-cost assignment (rectangular linear sum assignment) in pure TensorFlow, XLA-safe.

`linear_sum_assignment` solves a batch of problems at once: each valid row (a ground-truth object) gets a distinct
column (a prediction) so that the total cost is minimal, like `scipy.optimize.linear_sum_assignment`, but inside a
compiled step with static shapes. Jonker-Volgenant (LAPJV): column duals v and implied row duals, vectorised:

  1. Greedy start (`matching_init.greedy_start`): every valid row takes its cheapest column, the first row keeping
     a contested one. Only the rows up to each problem's last valid row are read, a few hundred per loop trip.
  2. Augmenting row reduction over the whole batch (`matching_init.row_reduction`): the free rows, queued, bid
     16 per trip for their cheapest column, lowering its dual by their gap to the second cheapest (auction with
     eps = 0); the largest offer wins, a loser takes its second column if that is free; bumped rows are queued
     again. Stops when the queue is empty or after a run of trips that take no free column (a price war).
  3. Shortest augmenting paths (`_search`) for the rows still free: one label-correcting Dijkstra per problem at a
     time, problems in 32 lanes, each trip relaxing up to 8 columns per lane (the nearest open column of each of
     8 column groups); when no open column is left below the nearest free column, that column ends a shortest
     augmenting path: the same trip updates the duals and flips the path (a short loop over its columns).

Every phase keeps v <= 0, v = 0 on free columns and every assigned row on a column of least reduced cost, so the
result is optimal. XLA:CPU runs a loop trip as a few dozen kernels (thunks) of ~0.2-1 us each, so the work is shaped
for it: cost rows are read with one-row gathers (dynamic slices, 4 fused per kernel; a gather of many rows from the
large cost matrix is split across threads), and the arrays of a trip stay small.

Non-finite costs: NaN and +inf are forbidden pairs, -inf preferred pairs. They stand for `hi + R * (hi - lo) + 1`
and `lo - R * (hi - lo) - 1`, lo and hi being the smallest and largest finite costs of the problem's valid rows,
so an assignment with fewer forbidden (more -inf) pairs always costs less. The result is always a complete
assignment with distinct columns, never NaN: optimal whenever a feasible assignment exists, with as few forbidden
pairs as possible otherwise (where scipy raises). Finite costs must keep |cost| * R below about 1e37.
"""

import tensorflow as tf

from tfreward.ops import matching_init


def _augment(row4col, pred, owner, sink, done):
  """Flips the augmenting paths ending at column `sink` [L] of the lanes `done` [L], one column per loop trip.

  pred: [L, C] int32 extended column (0 the root, j + 1 column j) whose row reached each column; owner: [L, C + 1]
  int32 row of each extended column before the flip.
  """
  col_ids = tf.range(row4col.shape[-1], dtype=tf.int32)

  def hop(col, row4col):
    here = tf.maximum(col - 1, 0)
    back = tf.gather(pred, here, batch_dims=1)  # [L] extended column before this one on the path
    row4col = tf.where((col > 0)[:, None] & tf.equal(col_ids, here[:, None]),
                       tf.gather(owner, back, batch_dims=1)[:, None], row4col)
    return tf.where(col > 0, back, 0), row4col

  return tf.while_loop(lambda col, _: tf.reduce_any(col > 0), hop, (tf.where(done, sink + 1, 0), row4col),
                       maximum_iterations=row4col.shape[-1])[1]


def _relax(blocks, v, lane, pop, offset, floor):
  """Distances through the rows of the popped columns: per lane, the least over its slots of max(c - v + offset, floor).

  Args:
    blocks: [<= 4, C] sanitized cost rows of the [L * K] slots (lane-major); v: [L, C] column duals.
    lane, pop: [L * K] int32 lane and popped extended column of each slot; offset, floor: [L * K] float32.

  Returns:
    best: [L, C] float32 least distance to each column; parent: [L, C] int32 the popped column attaining it (the
    lowest on ties).
  """
  num_lanes, num_cols = v.shape
  through = []
  for k, block in enumerate(blocks):
    part = slice(4 * k, 4 * k + block.shape[0])
    through.append(tf.maximum(block - tf.gather(v, lane[part]) + offset[part, None], floor[part, None]))
  through = tf.reshape(tf.concat(through, 0), [num_lanes, -1, num_cols])  # [L, K, C]
  best = tf.reduce_min(through, axis=1)
  pops = tf.reshape(pop, [num_lanes, -1, 1])
  return best, tf.reduce_min(tf.where(through <= best[:, None, :], pops, tf.int32.max), axis=1)


def _search(flat_cost, base, row4col, v, free, forbidden, preferred, pops):
  """Shortest augmenting paths for the free rows of every lane, `pops` columns relaxed per lane and trip.

  One search per lane at a time, rooted at the lowest free row: a label-correcting Dijkstra over reduced costs, on
  extended columns (0 the root, j + 1 column j). Every trip relaxes the rows of up to `pops` columns whose distance
  fell since they were last relaxed and stays below the nearest free column (the nearest such column of each
  group `extended column % pops`, so the nearest overall too); when none is left, that free column ends a shortest
  augmenting path, and the same trip updates the duals, flips the path and starts the lane's next search. Row
  duals are implied by the tight pairs; the root's is left at 0, which shifts its search's distances by a constant.

  Args:
    flat_cost: [P * R, C] float32 costs; base: [L] int32 flat id of row 0 of each lane's problem.
    row4col: [L, C] int32 (-1 free); v: [L, C] float32 column duals; free: [L, R] bool free valid rows.
    forbidden, preferred: [L] float32 stand-ins; pops: int, columns relaxed per lane and trip.

  Returns:
    row4col: [L, C] int32 complete assignment; trips: int32 scalar.
  """
  (num_lanes, num_cols), num_rows = row4col.shape, free.shape[-1]
  ext_ids = tf.range(num_cols + 1, dtype=tf.int32)
  row_ids = tf.range(num_rows, dtype=tf.int32)
  lane = tf.repeat(tf.range(num_lanes, dtype=tf.int32), pops)  # [L * K]
  slot_forbidden, slot_preferred = tf.gather(forbidden, lane), tf.gather(preferred, lane)
  inf = float("inf")

  def start(free):
    """Each lane's next root (R if none), distances (0 for the root) and open columns (the root)."""
    root = tf.reduce_min(tf.where(free, row_ids, num_rows), axis=-1)
    is_root = tf.equal(ext_ids, 0)
    return root, tf.where(is_root, 0.0, inf) + tf.zeros([num_lanes, 1]), is_root & (root < num_rows)[:, None]

  def finish(done, row4col, v, free, root, dist, pred, open_, nearest):
    """Ends the searches of the lanes `done`: duals, path flip, next root."""
    owner = tf.concat([root[:, None], row4col], axis=1)
    free_col = tf.pad(row4col < 0, [[0, 0], [1, 0]])
    v = tf.where(done[:, None] & (dist[:, 1:] < nearest[:, None]), v - (nearest[:, None] - dist[:, 1:]), v)
    sink = tf.reduce_min(tf.where(free_col & (dist <= nearest[:, None]), ext_ids, num_cols + 1), axis=-1) - 1
    row4col = _augment(row4col, pred, owner, sink, done)
    free &= tf.logical_not(done[:, None] & tf.equal(row_ids, root[:, None]))
    new_root, new_dist, new_open = start(free)
    done_ext = done[:, None]
    return (row4col, v, free, tf.where(done, new_root, root), tf.where(done_ext, new_dist, dist), pred,
            tf.where(done_ext, new_open, open_), tf.where(done, inf, nearest))

  def body(trips, row4col, v, free, root, dist, pred, open_, nearest):
    # The nearest open column of each group (the lowest index on ties).
    key = tf.where(open_, dist, inf)
    low = matching_init.grouped_min(key, pops, inf)  # [L, K]
    tiled = tf.tile(low, [1, -(-(num_cols + 1) // pops)])[:, :num_cols + 1]  # low of each column's group
    pop = matching_init.grouped_min(tf.where(open_ & (key <= tiled), ext_ids, num_cols), pops, num_cols)
    ok, pop = tf.reshape(low < inf, [-1]), tf.reshape(pop, [-1])  # [L * K] lane-major; pop is C when not ok
    owner = tf.concat([root[:, None], row4col], axis=1)  # [L, C + 1] row reached through each extended column
    row = tf.clip_by_value(tf.gather(tf.reshape(owner, [-1]), lane * (num_cols + 1) + pop), 0, num_rows - 1)
    blocks = matching_init.cost_rows(flat_cost, tf.gather(base, lane) + row, slot_forbidden, slot_preferred)
    # A held column's row dual is its reduced cost there: c[row, col] - v[col].
    held = tf.maximum(pop - 1, 0)
    own = tf.concat([tf.gather(block, held[4 * k:4 * k + block.shape[0]], batch_dims=1)
                     for k, block in enumerate(blocks)], 0) - tf.gather(tf.reshape(v, [-1]), lane * num_cols + held)
    at = tf.where(ok, tf.gather(tf.reshape(dist, [-1]), lane * (num_cols + 1) + pop), inf)
    root_slot = tf.equal(pop, 0)
    best, parent = _relax(blocks, v, lane, pop, tf.where(root_slot, 0.0, at - own), tf.where(root_slot, -inf, at))
    update = best < dist[:, 1:]
    popped = tf.reduce_any(tf.equal(ext_ids[:, None], tf.reshape(pop, [num_lanes, 1, pops]))
                           & tf.reshape(ok, [num_lanes, 1, pops]), axis=-1)  # [L, C + 1]
    dist = tf.concat([dist[:, :1], tf.where(update, best, dist[:, 1:])], axis=1)
    pred = tf.where(update, parent, pred)
    nearest = tf.reduce_min(tf.where(row4col < 0, dist[:, 1:], inf), axis=-1)  # [L]
    # A column stays open while its distance fell since its row was relaxed and it is nearer than a free column.
    open_ = ((open_ & tf.logical_not(popped)) | tf.pad(update, [[0, 0], [1, 0]])) & (dist < nearest[:, None])
    done = (root < num_rows) & tf.logical_not(tf.reduce_any(open_, axis=-1))
    state = (row4col, v, free, root, dist, pred, open_, nearest)
    return (trips + 1,) + tuple(tf.cond(tf.reduce_any(done), lambda: finish(done, *state), lambda: state))

  root, dist, open_ = start(free)
  init = (tf.constant(0, tf.int32), row4col, v, free, root, dist, tf.zeros_like(row4col), open_,
          tf.fill([num_lanes], inf))
  out = tf.while_loop(lambda trips, row4col, v, free, root, *_: tf.reduce_any(root < num_rows), body, init,
                      maximum_iterations=4 * (num_rows + 1) * (num_cols + 1))
  return out[1], out[0]


def _solve(flat_cost, row_valid, lanes=32, bidders=16, pops=8, patience=16, chunk_bytes=1 << 20, rows_per_trip=32):
  """Solves P problems of [R, C], given as [P * R, C] float32 costs, with [P, R] bool valid rows.

  Greedy start (`chunk_bytes` of rows per trip) and row reduction (`bidders` rows per trip, `patience`) over the
  whole batch, then shortest augmenting path searches for the problems that still have free rows, `lanes` of them
  at a time (waves), each relaxing up to `pops` columns per trip (at most `rows_per_trip` cost rows over all lanes).

  Returns [P, R] int32 columns (-1 for invalid rows) and int32 [3] loop trips (greedy, reduction, searches).
  """
  num_rows, num_cols = row_valid.shape[-1], flat_cost.shape[-1]
  num_problems = tf.shape(row_valid)[0]
  chunk = max(8, min(256, chunk_bytes // (4 * num_cols)))
  row4col, col4row, queue, queued, non_finite, greedy_trips = matching_init.greedy_start(flat_cost, row_valid, chunk)
  forbidden, preferred = matching_init.stand_ins(flat_cost, row_valid, non_finite)
  row4col, col4row, v, rounds = matching_init.row_reduction(flat_cost, row4col, col4row, queue, queued, forbidden,
                                                            preferred, bidders, patience)
  row_free = row_valid & (tf.reshape(col4row, tf.shape(row_valid)) < 0)
  if row_valid.shape[0] is not None:
    lanes = max(1, min(lanes, row_valid.shape[0]))
  pops = max(1, min(pops, rows_per_trip // lanes))  # cost rows read per search trip over all lanes
  # Problems with free rows, packed; spare slots point at a dummy problem P whose state is never used.
  pending, num_pending = matching_init.compact(tf.reduce_any(row_free, axis=-1), num_problems)
  pending = tf.pad(pending, [[0, lanes]], constant_values=num_problems)
  pad = lambda x, value=0: tf.pad(x, [[0, 1]] + [[0, 0]] * (x.shape.rank - 1), constant_values=value)
  row4col, row_free, v, forbidden, preferred = pad(row4col, -1), pad(row_free), pad(v), pad(forbidden), pad(preferred)
  col4row = pad(tf.reshape(col4row, tf.shape(row_valid)), -1)

  def wave(start, col4row, trips):
    problems = tf.slice(pending, [start], [lanes])  # [L]
    base = tf.minimum(problems, num_problems - 1) * num_rows  # idle lanes never read their rows
    lane_rows, search_trips = _search(flat_cost, base, tf.gather(row4col, problems), tf.gather(v, problems),
                                      tf.gather(row_free, problems), tf.gather(forbidden, problems),
                                      tf.gather(preferred, problems), pops)
    col4row = tf.tensor_scatter_nd_update(col4row, problems[:, None], _scatter_rows(lane_rows, num_rows))
    return start + lanes, col4row, trips + search_trips

  _, col4row, trips = tf.while_loop(lambda start, *_: start < num_pending, wave,
                                    (tf.constant(0, tf.int32), col4row, tf.constant(0, tf.int32)))
  return tf.where(row_valid, col4row[:-1], -1), tf.stack([greedy_trips, rounds, trips])


def _scatter_rows(row4col, num_rows):
  """Inverts the column -> row map: [P, C] int32 (-1 free) -> [P, R] int32 column of each row (-1 unassigned)."""
  num_problems, num_cols = tf.shape(row4col)[0], row4col.shape[-1]
  problem = tf.broadcast_to(tf.range(num_problems, dtype=tf.int32)[:, None], tf.shape(row4col))
  index = tf.stack([problem, tf.maximum(row4col, 0)], axis=-1)  # [P, C, 2]
  cols = tf.where(row4col >= 0, tf.range(num_cols, dtype=tf.int32), -1)
  return tf.tensor_scatter_nd_max(tf.fill(tf.stack([num_problems, num_rows]), -1), index, cols)


def linear_sum_assignment(cost, row_valid=None):
  """Exact minimum-cost assignment of rows to distinct columns, batched over leading axes, XLA-compilable.

  Every valid row gets one column, no two valid rows share a column, and the total cost over valid rows is
  minimal (the value of `scipy.optimize.linear_sum_assignment` on the valid rows). Invalid rows are ignored: their
  costs may hold anything. Ties between optimal assignments are broken deterministically (not necessarily as
  scipy does).

  Args:
    cost: [..., R, C] float (computed in float32), R <= C, both static. Rows are ground-truth objects, columns
      predictions. NaN and +inf are forbidden pairs, -inf preferred pairs (rule in the module docstring).
    row_valid: optional [..., R] bool; False marks padding rows. Defaults to all rows valid.

  Returns:
    [..., R] int32: the column assigned to each valid row, -1 for invalid rows.

  Raises:
    ValueError: if `cost` is not at least 2-D, R or C is not static, R > C, or `row_valid` has the wrong shape.
  """
  return linear_sum_assignment_with_trips(cost, row_valid)[0]


def linear_sum_assignment_with_trips(cost, row_valid=None):
  """`linear_sum_assignment` that also returns its loop trips, for benchmarks and diagnostics.

  Returns:
    assignment: as `linear_sum_assignment`.
    trips: [2] int32, the trips of the greedy-start loop and of the search loop.
  """
  cost = tf.convert_to_tensor(cost)
  if cost.shape.rank is None or cost.shape.rank < 2:
    raise ValueError(f"cost must have shape [..., R, C] with a known rank >= 2, got shape {cost.shape}.")
  num_rows, num_cols = cost.shape[-2], cost.shape[-1]
  if num_rows is None or num_cols is None:
    raise ValueError(f"cost must have static R and C (last two dimensions), got shape {cost.shape}.")
  if num_rows > num_cols:
    raise ValueError(f"cost must have R <= C (rows are assigned to distinct columns), got shape {cost.shape}.")
  if not cost.dtype.is_floating:
    raise ValueError(f"cost must be a floating tensor, got dtype {cost.dtype.name}.")
  cost = tf.cast(cost, tf.float32)
  batch_shape = tf.shape(cost)[:-2]
  if row_valid is None:
    row_valid = tf.ones(tf.concat([batch_shape, [num_rows]], axis=0), tf.bool)
  else:
    row_valid = tf.convert_to_tensor(row_valid)
    if row_valid.dtype != tf.bool:
      raise ValueError(f"row_valid must be bool, got dtype {row_valid.dtype.name}.")
    if row_valid.shape.rank is not None and (row_valid.shape.rank != cost.shape.rank - 1
                                             or not row_valid.shape[:-1].is_compatible_with(cost.shape[:-2])
                                             or row_valid.shape[-1] not in (None, num_rows)):
      raise ValueError(f"row_valid must have shape {cost.shape[:-1]} (cost's [..., R]), got {row_valid.shape}.")
  if num_rows == 0 or 0 in cost.shape[:-2]:
    return tf.fill(tf.concat([batch_shape, [num_rows]], axis=0), -1), tf.zeros([2], tf.int32)
  flat_cost = tf.reshape(cost, [-1, num_cols])  # [P * R, C], the one form the solver reads
  flat_valid = tf.reshape(row_valid, [-1, num_rows])  # [P, R]
  assignment, trips = _solve(flat_cost, flat_valid)
  return tf.reshape(assignment, tf.concat([batch_shape, [num_rows]], axis=0)), tf.stack([trips[0], trips[1] + trips[2]])
