"""The start of the exact assignment solver (`tfreward.ops.matching`): cost clean-up and augmenting row reduction.

Row reduction keeps the invariant the shortest-path searches need: column duals v <= 0, zero on every free column,
and every assigned row holds a column of least reduced cost `c[i, j] - v[j]` (its row dual u[i] is that minimum).
"""

import tensorflow as tf


def stand_ins(flat_cost, row_valid, non_finite):
  """[P] float32 values standing for forbidden (NaN, +inf) and preferred (-inf) pairs.

  They need the finite cost range of each problem: a loop over the problems that runs only when some valid cost is
  non-finite (one [R, C] problem at a time, so the compiled program keeps no [P, R, C] temporary).

  Args:
    flat_cost: [P * R, C] float32 (the solver reads the costs in this one form: when they are computed in the same
      program, a second form would make XLA compute them twice); row_valid: [P, R] bool; non_finite: bool scalar.
  """
  num_rows = row_valid.shape[-1]
  row_ids = tf.range(num_rows)

  def finite_range(p, lo, hi):
    problem = tf.gather(flat_cost, p * num_rows + row_ids)  # [R, C]
    finite = tf.math.is_finite(problem) & tf.gather(row_valid, p)[:, None]
    low, high = (tf.reduce_min(tf.where(finite, problem, float("inf"))),
                 tf.reduce_max(tf.where(finite, problem, float("-inf"))))
    at = tf.equal(tf.range(tf.shape(lo)[0]), p)
    return p + 1, tf.where(at & (low <= high), low, lo), tf.where(at & (low <= high), high, hi)

  zeros = tf.zeros(tf.shape(row_valid)[:1])
  _, lo, hi = tf.while_loop(lambda p, *_: non_finite & (p < tf.shape(row_valid)[0]), finite_range,
                            (tf.constant(0), zeros, zeros))
  span = (hi - lo) * float(num_rows) + 1.0
  return hi + span, lo - span


def cost_rows(flat_cost, ids, forbidden, preferred, group=4):
  """Rows `ids` [N] (static N) of the flattened costs [P * R, C], non-finite entries replaced, in [<= group, C] blocks.

  One row per gather (XLA turns it into a dynamic slice, `group` of them fused per block): a gather of many rows
  from the large cost matrix is costed by the whole matrix and split across threads (a thread hand-off per trip),
  and tf.slice would make XLA want its start, hence the costs, as compile-time constants (a compilation per call).

  Args:
    forbidden, preferred: [N] float32 stand-ins for each row's problem.

  Returns:
    A list of [<= group, C] float32 blocks, rows in the order of `ids`.
  """
  blocks = []
  for start in range(0, ids.shape[0], group):
    stop = min(start + group, ids.shape[0])
    block = tf.stack([tf.gather(flat_cost, ids[k]) for k in range(start, stop)])
    replaced = tf.where(tf.equal(block, float("-inf")), preferred[start:stop, None], forbidden[start:stop, None])
    blocks.append(tf.where(tf.math.is_finite(block), block, replaced))
  return blocks


def running_count(x):
  """Inclusive running sum of a 1-D int32 vector: a triangular mask and one reduction (XLA's cumsum takes about
  0.1 ms on CPU for 10k elements); tf.cumsum above 2048 entries."""
  if x.shape[0] is None or x.shape[0] > 2048:
    return tf.cumsum(x)
  ids = tf.range(x.shape[0])
  return tf.reduce_sum(tf.where(ids[None, :] <= ids[:, None], x[None, :], 0), axis=1)


def compact(mask, spare):
  """Indices of the True entries of a 1-D bool vector, in order, then `spare`: int32 [size + 1] and their count."""
  size = tf.size(mask)
  slot = tf.where(mask, running_count(tf.cast(mask, tf.int32)) - 1, size)
  ids = tf.tensor_scatter_nd_update(tf.fill([size + 1], spare), slot[:, None],
                                    tf.where(mask, tf.range(size, dtype=tf.int32), spare))
  return ids, tf.reduce_sum(tf.cast(mask, tf.int32))


def grouped_min(key, groups, pad):
  """[L, N] -> [L, groups]: the least entry among the indices n with n % groups == g (`pad` if there is none)."""
  size = key.shape[-1]
  padded = tf.pad(key, [[0, 0], [0, -size % groups]], constant_values=pad)
  return tf.reduce_min(tf.reshape(padded, [tf.shape(key)[0], -1, groups]), axis=1)


def _two_least(reduced, col_ids):
  """Least and second least value over the last axis of [K, C] and their first columns: four [K] tensors."""
  num_cols = reduced.shape[-1]
  u1 = tf.reduce_min(reduced, axis=-1)
  j1 = tf.reduce_min(tf.where(reduced <= u1[:, None], col_ids, num_cols), axis=-1)
  rest = tf.where(tf.equal(col_ids, j1[:, None]), float("inf"), reduced)
  u2 = tf.reduce_min(rest, axis=-1)
  return u1, j1, u2, tf.reduce_min(tf.where(rest <= u2[:, None], col_ids, num_cols), axis=-1)


def _winners(offer, problem, column):
  """Whether each of N entries makes the largest `offer` among the entries of its (problem, column), the first entry
  on ties: [N] bool from [N, N] pairwise comparisons (N is small)."""
  order = tf.range(offer.shape[0])
  rival = tf.equal(problem[:, None], problem[None, :]) & tf.equal(column[:, None], column[None, :])
  beats = (offer[None, :] > offer[:, None]) | (tf.equal(offer[None, :], offer[:, None]) & (order < order[:, None]))
  return tf.logical_not(tf.reduce_any(rival & beats, axis=-1))


def _auction(reduced, problem, ok, row4col):
  """One round of bids by K free rows at once (Jonker-Volgenant's augmenting row reduction).

  A row bids for its column of least reduced cost u1 and offers to lower that column's dual by the gap to its second
  least u2, which keeps the column of least reduced cost for it; the largest offer wins (then the first slot), and
  the column's previous row becomes free. A row that lost its first column takes its second if that is free and
  not won: after the winner's drop the first column costs it at least u2. A tie (u1 = u2) takes a free column of
  least reduced cost if there is one and otherwise makes no bid.

  Args:
    reduced: [K, C] float32 c - v of each row (finite); problem: [K] int32; ok: [K] bool rows that may bid;
    row4col: [P + 1, C] int32 (-1 free).

  Returns:
    target: [K] int32 column won; pay: [K] float32 drop of its dual; win: [K] bool; bid: [K] bool.
  """
  u1, j1, u2, j2 = _two_least(reduced, tf.range(reduced.shape[-1]))
  gap = u2 - u1
  free2 = tf.gather_nd(row4col, tf.stack([problem, j2], -1)) < 0
  first = (gap > 0) | (tf.gather_nd(row4col, tf.stack([problem, j1], -1)) < 0)
  target = tf.where(first, j1, j2)
  bid = ok & (first | free2)
  pay = tf.where(first, gap, 0.0)
  win = bid & _winners(tf.where(bid, pay, -1.0), problem, target)
  # Second choices compete after the won columns (which offer more than any gap), the first slot winning.
  second = first & bid & tf.logical_not(win) & free2
  offers = tf.concat([tf.where(win, float("inf"), -1.0), tf.where(second, 0.0, -1.0)], 0)
  second &= _winners(offers, tf.tile(problem, [2]), tf.concat([target, j2], 0))[ok.shape[0]:]
  return tf.where(second, j2, target), tf.where(second, 0.0, pay), win | second, bid


def _settle(ids, problem, target, pay, win, row4col, col4row, v, num_rows):
  """Gives the won columns to their rows: row4col [P + 1, C], col4row [P * R + 1] and v [P + 1, C] (the last row or
  entry is a spare that losers write to). Returns them and the flat ids [K] of the rows bumped (-1 if none)."""
  index = tf.stack([problem, target], -1)
  old = tf.gather_nd(row4col, index)  # previous row of the won column, -1 if free
  spare = tf.where(win[:, None], index, tf.stack([tf.shape(row4col)[0] - 1, 0])[None, :])
  v = tf.tensor_scatter_nd_sub(v, spare, tf.where(win, pay, 0.0))
  row4col = tf.tensor_scatter_nd_update(row4col, spare, ids % num_rows)
  bumped = tf.where(win & (old >= 0), problem * num_rows + old, -1)
  last = tf.size(col4row) - 1
  col4row = tf.tensor_scatter_nd_update(col4row, tf.where(win, ids, last)[:, None], target)
  col4row = tf.tensor_scatter_nd_update(col4row, tf.where(bumped >= 0, bumped, last)[:, None], -tf.ones_like(old))
  return row4col, col4row, v, bumped


def _enqueue(queue, tail, ids, keep):
  """Appends the `ids` [K] with `keep` [K] to a ring buffer `queue` [Q + 1] (last entry spare) at slot `tail`."""
  size = tf.size(queue) - 1
  slot = tf.where(keep, (tail + running_count(tf.cast(keep, tf.int32)) - 1) % size, size)
  return tf.tensor_scatter_nd_update(queue, slot[:, None], ids), tail + tf.reduce_sum(tf.cast(keep, tf.int32))


def greedy_start(flat_cost, row_valid, chunk):
  """Each valid row takes its cheapest column, the first row winning a contested one; the others are queued.

  The rows up to each problem's last valid row (for padded targets, exactly the valid rows) are lined up problem
  after problem and read `chunk` at a time (one gather): ceil(their number / chunk) loop trips, and padding rows at
  the end of a problem cost nothing. Column duals stay 0, so every assigned row holds a column of least cost.

  Args:
    flat_cost: [P * R, C] float32; row_valid: [P, R] bool; chunk: int rows per loop trip.

  Returns:
    row4col: [P + 1, C] int32 the row holding each column (-1 free); col4row: [P * R + 1] int32 the column of each
      flat row (-1 none) (last rows and entries are spares).
    queue: [P * R + 1] int32 flat ids of the free valid rows, a ring buffer; queued: int32 their number.
    non_finite: bool scalar, whether some valid row holds a non-finite cost; trips: int32 scalar.
  """
  num_rows, num_cols = row_valid.shape[-1], flat_cost.shape[-1]
  num_problems = tf.shape(row_valid)[0]
  flat_valid = tf.reshape(row_valid, [-1])  # [P*R]
  length = tf.reduce_max(tf.where(row_valid, tf.range(1, num_rows + 1), 0), axis=1)  # [P] rows to visit
  start = running_count(length) - length  # [P] first slot of each problem
  total = tf.reduce_sum(length)
  slots = tf.range(chunk, dtype=tf.int32)
  col_ids = tf.range(num_cols, dtype=tf.int32)
  never = tf.int32.max

  def body(trip, row4col, col4row, queue, queued, non_finite):
    pos = trip * chunk + slots  # [K]
    problem = tf.reduce_sum(tf.cast(start[None, :] <= pos[:, None], tf.int32), axis=1) - 1  # [K]
    ids = problem * num_rows + tf.minimum(pos - tf.gather(start, problem), num_rows - 1)  # [K] flat row ids
    live = (pos < total) & tf.gather(flat_valid, ids)
    block = tf.gather(flat_cost, ids)  # [K, C]
    non_finite |= tf.reduce_any(live & tf.logical_not(tf.math.is_finite(tf.reduce_sum(block, axis=-1))))
    key = tf.where(tf.math.is_nan(block), float("inf"), block)  # NaN sorts like +inf, as in the stand-ins
    best = tf.reduce_min(tf.where(key <= tf.reduce_min(key, -1, keepdims=True), col_ids, num_cols - 1), -1)  # [K]
    index = tf.stack([problem, best], axis=-1)  # [K, 2] (problem, column)
    bid = live & (tf.gather_nd(row4col, index) < 0)
    claim = tf.tensor_scatter_nd_min(tf.fill(tf.shape(row4col), never), index, tf.where(bid, pos, never))
    win = bid & tf.equal(tf.gather_nd(claim, index), pos)  # the first row bidding for a free column
    row4col = tf.tensor_scatter_nd_max(row4col, index, tf.where(win, ids % num_rows, -1))
    col4row = tf.tensor_scatter_nd_max(col4row, ids[:, None], tf.where(win, best, -1))
    queue, queued = _enqueue(queue, queued, ids, live & tf.logical_not(win))
    return trip + 1, row4col, col4row, queue, queued, non_finite

  no_row = tf.fill([tf.size(flat_valid) + 1], -1)
  init = (tf.constant(0, tf.int32), tf.fill(tf.stack([num_problems + 1, num_cols]), -1), no_row, no_row,
          tf.constant(0, tf.int32), tf.constant(False))
  out = tf.while_loop(lambda trip, *_: trip * chunk < total, body, init)
  return out[1:] + out[:1]


def row_reduction(flat_cost, row4col, col4row, queue, queued, forbidden, preferred, bidders, patience):
  """The following rounds of row reduction: the queued free rows bid, `bidders` of them per loop trip.

  A row that lost its bid, or lost its column, joins the end of the queue; a row that made no bid leaves it (it is
  left to the searches). The loop stops when the queue is empty or after `patience` trips in which no free column
  was taken (bids that only move columns between rows: a price war).

  Args:
    flat_cost: [P * R, C] float32 costs; row4col, col4row, queue, queued: as returned by `greedy_start`.
    forbidden, preferred: [P] float32 stand-ins; bidders, patience: int.

  Returns:
    row4col: [P, C] int32; col4row: [P * R] int32; v: [P, C] float32; trips: int32 scalar.
  """
  num_rows = (tf.size(col4row) - 1) // (tf.shape(row4col)[0] - 1)
  slot = tf.range(bidders, dtype=tf.int32)

  def body(trip, head, tail, since, row4col, col4row, v, queue):
    ok = head + slot < tail
    ids = tf.maximum(tf.gather(queue, (head + slot) % (tf.size(queue) - 1)), 0)  # [K] flat row ids
    problem = ids // num_rows
    blocks = cost_rows(flat_cost, ids, tf.gather(forbidden, problem), tf.gather(preferred, problem))
    reduced = tf.concat(blocks, 0) - tf.gather(v, problem)
    target, pay, win, bid = _auction(reduced, problem, ok, row4col)
    newly = tf.reduce_any(win & (tf.gather_nd(row4col, tf.stack([problem, target], -1)) < 0))
    row4col, col4row, v, bumped = _settle(ids, problem, target, pay, win, row4col, col4row, v, num_rows)
    head = tf.minimum(head + bidders, tail)
    queue, tail = _enqueue(queue, tail, tf.concat([ids, bumped], 0),
                           tf.concat([bid & tf.logical_not(win), bumped >= 0], 0))
    return trip + 1, head, tail, tf.where(newly, 0, since + 1), row4col, col4row, v, queue

  init = (tf.constant(0, tf.int32), tf.constant(0, tf.int32), queued, tf.constant(0, tf.int32), row4col, col4row,
          tf.zeros(tf.shape(row4col)), queue)
  trips, _, _, _, row4col, col4row, v, _ = tf.while_loop(
      lambda trip, head, tail, since, *_: (head < tail) & (since < patience), body, init,
      maximum_iterations=patience * tf.size(col4row))  # `since` restarts at most once per free row
  return row4col[:-1], col4row[:-1], v[:-1], trips
