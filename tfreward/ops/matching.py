"""Exact minimum-cost assignment (rectangular linear sum assignment) in pure TensorFlow, XLA-safe.

`linear_sum_assignment` solves a batch of problems at once: each valid row (a ground-truth object) gets a distinct
column (a prediction) so that the total cost is minimal, like `scipy.optimize.linear_sum_assignment`, but inside a
compiled step with static shapes. Shortest augmenting paths with dual variables (Jonker-Volgenant, the method of
scipy's rectangular solver), vectorised over problems:

  1. Greedy start: every row takes its cheapest column, the lowest row index keeping a contested one (column duals
     v = 0, row duals = row minima: dual feasible, assigned pairs tight). On detection costs this settles most
     rows. Only valid rows are read: those of the whole batch are packed and visited 256 per loop trip, so padding
     rows cost nothing and the cost matrix is never copied or scanned in full.
  2. Searches: each unsettled row roots a Dijkstra search over reduced costs `c[i, j] - u[i] - v[j]`, one popped
     column (O(C) work) per trip. A row joining the search tree stores the columns of its tree path as a bit set,
     so the trip that reaches a free column also flips the augmenting path and updates the column duals (no
     back-tracking trips). Row duals are implied by the tight pairs, `u[i] = c[i, col(i)] - v[col(i)]`.
  3. Only problems with unsettled rows are searched, 32 lanes at a time; a lane moves on to its problem's next
     free row after each augmentation, and the loop stops when every lane is done: trips = the largest number of
     Dijkstra steps of any problem (per wave of 32 problems), not rows x columns.

Non-finite costs: NaN and +inf are forbidden pairs, -inf preferred pairs. They stand for `hi + R * (hi - lo) + 1`
and `lo - R * (hi - lo) - 1`, lo and hi being the smallest and largest finite costs of the problem's valid rows,
so an assignment with fewer forbidden (more -inf) pairs always costs less. The result is always a complete
assignment with distinct columns, never NaN: optimal whenever a feasible assignment exists, with as few forbidden
pairs as possible otherwise (where scipy raises). Finite costs must keep |cost| * R below about 1e37.
"""

import tensorflow as tf


def _stand_ins(cost, row_valid, non_finite):
  """[P] float32 values standing for forbidden (NaN, +inf) and preferred (-inf) pairs.

  They need the finite cost range, a full pass over the costs: a loop of at most one trip skips it when every cost
  is finite (XLA would turn a tf.cond this cheap into a select and always pay for it).
  """
  def finite_range(done, lo, hi):
    finite = tf.math.is_finite(cost) & row_valid[:, :, None]
    lo = tf.reduce_min(tf.where(finite, cost, float("inf")), axis=[1, 2])
    hi = tf.reduce_max(tf.where(finite, cost, float("-inf")), axis=[1, 2])
    return tf.constant(True), tf.where(lo <= hi, lo, 0.0), tf.where(lo <= hi, hi, 0.0)

  zeros = tf.zeros(tf.shape(cost)[:1])
  _, lo, hi = tf.while_loop(lambda done, *_: tf.logical_not(done), finite_range,
                            (tf.logical_not(non_finite), zeros, zeros))
  span = (hi - lo) * float(cost.shape[-2]) + 1.0
  return hi + span, lo - span


def _sanitize(row_cost, forbidden, preferred):
  """Replaces non-finite entries of [P, C] costs by the [P] stand-ins."""
  replaced = tf.where(tf.equal(row_cost, float("-inf")), preferred[:, None], forbidden[:, None])
  return tf.where(tf.math.is_finite(row_cost), row_cost, replaced)


def _scatter_rows(row4col, num_rows):
  """Inverts the column -> row map: [P, C] int32 (-1 free) -> [P, R] int32 column of each row (-1 unassigned)."""
  num_problems, num_cols = tf.shape(row4col)[0], row4col.shape[-1]
  problem = tf.broadcast_to(tf.range(num_problems, dtype=tf.int32)[:, None], tf.shape(row4col))
  index = tf.stack([problem, tf.maximum(row4col, 0)], axis=-1)  # [P, C, 2]
  cols = tf.where(row4col >= 0, tf.range(num_cols, dtype=tf.int32), -1)
  return tf.tensor_scatter_nd_max(tf.fill(tf.stack([num_problems, num_rows]), -1), index, cols)


def _prefix_count(mask):
  """Inclusive running count of a 1-D bool vector, as int32: two small triangular matmuls (XLA's cumsum takes
  about 0.1 ms on CPU for 10k elements). Exact while the count stays below 2**24."""
  size = tf.size(mask)
  if mask.shape[0] is None or mask.shape[0] > (1 << 20):
    return tf.cumsum(tf.cast(mask, tf.int32))
  block = 32 if mask.shape[0] <= (1 << 15) else 256  # keeps the [blocks, blocks] triangle small
  x = tf.reshape(tf.pad(tf.cast(mask, tf.float32), [[0, -size % block]]), [-1, block])  # [nb, block]
  within = tf.matmul(x, tf.linalg.band_part(tf.ones([block, block]), 0, -1))  # [nb, block] count inside the block
  totals = within[:, -1]  # [nb]
  num_blocks = tf.shape(totals)[0]
  before = tf.linalg.matvec(tf.linalg.band_part(tf.ones(tf.stack([num_blocks, num_blocks])), -1, 0), totals) - totals
  return tf.cast(tf.reshape(within + before[:, None], [-1])[:size], tf.int32)


def _greedy_start(cost, row_valid, chunk):
  """Each valid row takes its cheapest column; the lowest row index wins a contested column.

  Only valid rows are read: the valid rows of all problems are packed into one list and visited `chunk` at a time,
  so the loop makes ceil(valid rows in the batch / chunk) trips and padding rows cost nothing.

  Returns:
    row4col: [P, C] int32, the row holding each column, -1 when free.
    row_free: [P, R] bool, valid rows left without a column.
    non_finite: bool scalar, whether some valid row holds a non-finite cost.
    trips: int32 scalar, loop trips.
  """
  num_rows, num_cols = cost.shape[-2], cost.shape[-1]
  num_problems = tf.shape(cost)[0]
  flat_cost = tf.reshape(cost, [-1, num_cols])  # [P*R, C]
  flat_valid = tf.reshape(row_valid, [-1])  # [P*R]
  valid_int = tf.cast(flat_valid, tf.int32)
  num_valid = tf.reduce_sum(valid_int)
  # order[i] = flat id of the i-th valid row (problem-major, ascending rows); invalid rows write 0 to a spare slot.
  length = tf.size(flat_valid) + chunk
  slot = tf.where(flat_valid, _prefix_count(flat_valid) - 1, length - 1)
  flat_ids = tf.range(tf.size(flat_valid), dtype=tf.int32)
  order = tf.tensor_scatter_nd_max(tf.zeros([length], tf.int32), slot[:, None], tf.where(flat_valid, flat_ids, 0))
  col_ids = tf.range(num_cols, dtype=tf.int32)
  slots = tf.range(chunk, dtype=tf.int32)
  never = tf.int32.max

  def body(trip, row4col, won, non_finite):
    pos = trip * chunk + slots  # [K]
    live = pos < num_valid
    ids = tf.gather(order, pos)  # [K] flat row ids
    block = tf.gather(flat_cost, ids)  # [K, C]
    key = tf.where(tf.math.is_nan(block), float("inf"), block)  # NaN sorts like +inf, as in the sanitized costs
    best = tf.reduce_min(tf.where(key <= tf.reduce_min(key, -1, keepdims=True), col_ids, num_cols), -1)  # [K]
    best = tf.minimum(best, num_cols - 1)
    non_finite |= tf.reduce_any(live & tf.logical_not(tf.math.is_finite(tf.reduce_sum(block, axis=-1))))
    index = tf.stack([ids // num_rows, best], axis=-1)  # [K, 2] (problem, column)
    free = tf.gather_nd(row4col, index) < 0
    claim = tf.tensor_scatter_nd_min(tf.fill(tf.shape(row4col), never), index, tf.where(live, pos, never))
    win = live & free & tf.equal(tf.gather_nd(claim, index), pos)  # first claimant of a free column
    row4col = tf.tensor_scatter_nd_max(row4col, index, tf.where(win, ids % num_rows, -1))
    won = tf.tensor_scatter_nd_max(won, ids[:, None], tf.cast(win, tf.int32))
    return trip + 1, row4col, won, non_finite

  init = (tf.constant(0, tf.int32), tf.fill(tf.stack([num_problems, num_cols]), -1), tf.zeros_like(valid_int),
          tf.constant(False))
  trips, row4col, won, non_finite = tf.while_loop(lambda trip, *_: trip * chunk < num_valid, body, init)
  row_free = row_valid & tf.equal(tf.reshape(won, tf.shape(row_valid)), 0)
  return row4col, row_free, non_finite, trips


def _unpack_bits(bits, num_cols):
  """[P, W] int32 bit sets -> [P, num_cols] bool (bit k of word w is column 32 * w + k)."""
  shifts = tf.range(32, dtype=tf.int32)
  mask = tf.bitwise.bitwise_and(tf.bitwise.right_shift(bits[:, :, None], shifts), 1) > 0  # [P, W, 32]
  return tf.reshape(mask, [tf.shape(bits)[0], -1])[:, :num_cols]


def _row_queue(row_free):
  """Free rows of each problem in ascending order: [P, R] int32 (padded with 0) and their count [P] int32."""
  num_rows = row_free.shape[-1]
  counts = tf.reduce_sum(tf.cast(row_free, tf.int32), axis=-1)  # [P]
  rank = tf.reshape(_prefix_count(tf.reshape(row_free, [-1])), tf.shape(row_free))  # running count over the batch
  local = rank - (rank[:, -1] - counts)[:, None] - 1  # [P, R] position among the problem's free rows
  problem = tf.broadcast_to(tf.range(tf.shape(row_free)[0], dtype=tf.int32)[:, None], tf.shape(row_free))
  index = tf.stack([problem, tf.where(row_free, local, num_rows)], axis=-1)  # non-free rows go to a spare column
  rows = tf.where(row_free, tf.range(num_rows, dtype=tf.int32), 0)
  queue = tf.tensor_scatter_nd_max(tf.zeros(tf.stack([tf.shape(row_free)[0], num_rows + 1]), tf.int32), index, rows)
  return queue[:, :num_rows], counts


def _search(cost, problems, row4col, queue, num_free, forbidden, preferred):
  """Shortest augmenting path searches for the free rows of L problems at once, one Dijkstra step per trip.

  Args:
    cost: [P, R, C] float32, all problems (rows are gathered from it).
    problems: [L] int32 problem of each lane.
    row4col: [L, C] int32 greedy assignment of each lane's problem (-1 free columns).
    queue, num_free: [L, R] int32 free rows of each lane's problem in order, and their number [L] (0: idle lane).
    forbidden, preferred: [L] float32 stand-ins for non-finite costs.

  Returns:
    row4col: [L, C] int32 final assignment; trips: int32 scalar.
  """
  num_rows, num_cols = cost.shape[-2], cost.shape[-1]
  num_lanes = tf.shape(problems)[0]
  col_ids = tf.range(num_cols, dtype=tf.int32)
  lane_ids = tf.range(num_lanes, dtype=tf.int32)
  num_words = -(-num_cols // 32)
  word_ids = tf.range(num_words, dtype=tf.int32)
  start_row = queue[:, 0]
  inf_cols = tf.fill(tf.shape(row4col), float("inf"))
  state = dict(
      row4col=row4col,  # [L, C] row holding each column, -1 free
      v=tf.zeros_like(inf_cols),  # [L, C] column duals
      shortest=inf_cols,  # [L, C] shortest reduced path length from the root to each column
      path=tf.zeros_like(row4col),  # [L, C] tree row from which each column was reached
      scanned=tf.zeros_like(row4col, dtype=tf.bool),  # [L, C] columns popped by the current search
      path_bits=tf.zeros(tf.stack([num_lanes, num_rows, num_words]), tf.int32),  # [L, R, W] root -> row columns
      served=tf.zeros_like(num_free),  # [L] free rows assigned so far (position in the queue)
      start_row=start_row,  # [L] root of the current search
      cur_row=start_row,  # [L] row added to the tree last trip
      cur_col=tf.fill(tf.shape(start_row), -1),  # [L] column through which cur_row joined, -1 for the root
      min_val=tf.zeros_like(start_row, dtype=tf.float32),  # [L] path length of the last popped column
      active=num_free > 0,  # [L]
      trips=tf.constant(0, tf.int32))

  def body(s):
    act = s["active"]
    act_c = act[:, None]
    row_cost = tf.gather_nd(cost, tf.stack([problems, s["cur_row"]], axis=-1))  # [L, C]
    reduced = _sanitize(row_cost, forbidden, preferred) - s["v"]
    u = tf.where(s["cur_col"] >= 0, tf.gather(reduced, tf.maximum(s["cur_col"], 0), batch_dims=1), 0.0)  # [L]
    unscanned = tf.logical_not(s["scanned"])
    dist = s["min_val"][:, None] + reduced - u[:, None]
    better = unscanned & (dist < s["shortest"]) & act_c
    shortest = tf.where(better, dist, s["shortest"])
    path = tf.where(better, s["cur_row"][:, None], s["path"])
    lowest = tf.reduce_min(tf.where(unscanned, shortest, float("inf")), axis=-1)  # [P]
    # Pop the first cheapest unscanned column, preferring a free one (ends the search soonest).
    tied = unscanned & (shortest <= lowest[:, None])
    key = tf.where(tied, tf.where(s["row4col"] < 0, col_ids, col_ids + num_cols), 2 * num_cols)
    col = tf.reduce_min(key, axis=-1) % num_cols  # [P]
    popped = tf.equal(col_ids, col[:, None])  # [P, C]
    scanned = s["scanned"] | (popped & act_c)
    owner = tf.gather(s["row4col"], col, batch_dims=1)  # [P]
    parent = tf.gather(path, col, batch_dims=1)  # [P]
    popped_bits = tf.where(tf.equal(word_ids, col[:, None] // 32), tf.bitwise.left_shift(1, col[:, None] % 32), 0)
    bits_to_here = tf.gather(s["path_bits"], parent, batch_dims=1) | popped_bits  # [P, W] root -> parent -> col
    sink = act & (owner < 0)
    grow = act & (owner >= 0)

    # Free column reached: flip the augmenting path (each of its columns goes to the row it was reached from) and
    # update the column duals of the scanned columns.
    sink_c = sink[:, None]
    row4col = tf.where(sink_c & _unpack_bits(bits_to_here, num_cols), path, s["row4col"])
    v = tf.where(sink_c & scanned, s["v"] - (lowest[:, None] - shortest), s["v"])
    served = s["served"] + tf.cast(sink, tf.int32)
    next_row = tf.gather(queue, tf.minimum(served, num_rows - 1), batch_dims=1)
    has_next = served < num_free

    # Held column reached: its row joins the tree (a root's entry stays empty: written with False otherwise).
    write_row = tf.where(grow, owner, s["start_row"])
    path_bits = tf.tensor_scatter_nd_update(s["path_bits"], tf.stack([lane_ids, write_row], axis=1),
                                            tf.where(grow[:, None], bits_to_here, 0))
    return [dict(
        row4col=row4col,
        v=v,
        shortest=tf.where(sink_c, float("inf"), shortest),
        path=path,
        scanned=scanned & tf.logical_not(sink_c),
        path_bits=path_bits,
        served=served,
        start_row=tf.where(sink, next_row, s["start_row"]),
        cur_row=tf.where(sink, next_row, tf.where(grow, owner, s["cur_row"])),
        cur_col=tf.where(sink, -1, tf.where(grow, col, s["cur_col"])),
        min_val=tf.where(sink, 0.0, tf.where(grow, lowest, s["min_val"])),
        active=tf.where(sink, has_next, act),
        trips=s["trips"] + 1)]

  # Each search pops at most R columns and there are at most R searches: R * R + 1 trips is a safe cap.
  state = tf.while_loop(lambda s: tf.reduce_any(s["active"]), body, [state],
                        maximum_iterations=num_rows * num_rows + 1)[0]
  return state["row4col"], state["trips"]


def _solve(cost, row_valid, chunk=256, lanes=32):
  """Solves [P, R, C] float32 problems with [P, R] bool valid rows.

  After the greedy start only the problems with free rows are searched, `lanes` of them at a time (waves), so a
  search trip costs O(lanes * C) whatever the batch.

  Returns [P, R] int32 columns (-1 for invalid rows) and int32 [2] loop trips (greedy start, searches).
  """
  num_rows = cost.shape[-2]
  num_problems = tf.shape(cost)[0]
  row4col, row_free, non_finite, greedy_trips = _greedy_start(cost, row_valid, chunk)
  forbidden, preferred = _stand_ins(cost, row_valid, non_finite)
  queue, num_free = _row_queue(row_free)

  # Problems with free rows, packed: pending[i] = i-th such problem; spare slots point at a dummy problem P.
  if cost.shape[0] is not None:
    lanes = max(1, min(lanes, cost.shape[0]))
  needs = num_free > 0
  slot = tf.where(needs, _prefix_count(needs) - 1, num_problems + lanes - 1)
  pending = tf.tensor_scatter_nd_min(tf.fill([num_problems + lanes], num_problems), slot[:, None],
                                     tf.where(needs, tf.range(num_problems, dtype=tf.int32), num_problems))
  num_pending = tf.reduce_sum(tf.cast(needs, tf.int32))
  # One spare row for the dummy problem: idle lanes read it and write their (unchanged) state back to it.
  row4col = tf.pad(row4col, [[0, 1], [0, 0]], constant_values=-1)
  queue = tf.pad(queue, [[0, 1], [0, 0]])
  num_free = tf.pad(num_free, [[0, 1]])
  forbidden = tf.pad(forbidden, [[0, 1]])
  preferred = tf.pad(preferred, [[0, 1]])

  def wave(start, row4col, trips):
    problems = tf.slice(pending, [start], [lanes])  # [L]
    safe = tf.minimum(problems, num_problems - 1)  # rows of `cost` to read; idle lanes never read them
    lane_rows, lane_trips = _search(cost, safe, tf.gather(row4col, problems), tf.gather(queue, problems),
                                    tf.gather(num_free, problems), tf.gather(forbidden, problems),
                                    tf.gather(preferred, problems))
    return start + lanes, tf.tensor_scatter_nd_update(row4col, problems[:, None], lane_rows), trips + lane_trips

  _, row4col, search_trips = tf.while_loop(lambda start, *_: start < num_pending, wave,
                                           (tf.constant(0, tf.int32), row4col, tf.constant(0, tf.int32)))
  col4row = _scatter_rows(row4col[:-1], num_rows)
  return tf.where(row_valid, col4row, -1), tf.stack([greedy_trips, search_trips])


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
  flat_cost = tf.reshape(cost, [-1, num_rows, num_cols])  # [P, R, C]
  flat_valid = tf.reshape(row_valid, [-1, num_rows])  # [P, R]
  assignment, trips = _solve(flat_cost, flat_valid)
  return tf.reshape(assignment, tf.concat([batch_shape, [num_rows]], axis=0)), trips
