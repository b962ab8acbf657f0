"""Exact in-graph linear sum assignment against scipy (host reference), eager and XLA."""

import numpy as np
import pytest
import scipy.optimize
import tensorflow as tf

from tfreward.ops import matching

_jit_solve_with_trips = tf.function(matching.linear_sum_assignment_with_trips, jit_compile=True)

# Every XLA test uses one of a few shapes so that the suite compiles only a handful of programs.
WIDE = (4, 6, 15)
SQUARE = (4, 15, 15)


def _jit_solve(cost, valid):
  return _jit_solve_with_trips(cost, valid)[0]


def _check_optimal(cost, valid, assignment, rtol=1e-5):
  """Every valid row has a distinct column, invalid rows -1, total cost equal to scipy's optimum."""
  flat_cost = cost.reshape(-1, *cost.shape[-2:]).astype(np.float64)
  flat_valid = valid.reshape(-1, cost.shape[-2])
  flat_assign = assignment.reshape(flat_valid.shape)
  for c, v, a in zip(flat_cost, flat_valid, flat_assign):
    np.testing.assert_array_equal(a[~v], -1)
    rows = np.nonzero(v)[0]
    cols = a[rows]
    assert np.all(cols >= 0) and len(set(cols.tolist())) == len(rows), cols
    if not len(rows):
      continue
    r, col = scipy.optimize.linear_sum_assignment(c[rows])
    optimum = c[rows][r, col].sum()
    np.testing.assert_allclose(c[rows, cols].sum(), optimum, rtol=rtol, atol=rtol)


def _costs(kind, shape, rng):
  if kind == "normal":
    return rng.normal(size=shape)
  if kind == "ties":  # few distinct values: many tied optima
    return rng.integers(0, 3, size=shape)
  if kind == "integers":
    return rng.integers(-50, 50, size=shape)
  if kind == "constant":
    return np.ones(shape)
  if kind == "scaled":
    return rng.random(shape) * 1e3 + 1e4
  raise ValueError(kind)


@pytest.mark.parametrize("shape", [WIDE, SQUARE])
def test_matches_scipy_eager_and_xla(shape):
  """Random, tied, integer, constant and offset costs; leading axes [2, 2] in eager mode, flat under XLA."""
  rng = np.random.default_rng(shape[-2])
  for kind in ("normal", "ties", "integers", "constant", "scaled"):
    cost = _costs(kind, shape, rng).astype(np.float32)
    valid = rng.random(shape[:2]) < 0.75
    valid[0] = True  # one problem with every row valid
    valid[1] = False  # one all-padding problem
    eager = matching.linear_sum_assignment(cost.reshape(2, 2, *shape[1:]), valid.reshape(2, 2, -1)).numpy()
    compiled = _jit_solve(cost, valid).numpy()
    assert compiled.dtype == np.int32 and compiled.shape == shape[:2]
    np.testing.assert_array_equal(eager.reshape(shape[:2]), compiled)
    _check_optimal(cost, valid, compiled)
    np.testing.assert_array_equal(compiled[1], -1)


def test_many_random_problems_are_optimal():
  rng = np.random.default_rng(7)
  for trial in range(30):
    cost = _costs(("normal", "ties", "integers")[trial % 3], WIDE, rng).astype(np.float32)
    valid = rng.random(WIDE[:2]) < rng.random((WIDE[0], 1))
    _check_optimal(cost, valid, _jit_solve(cost, valid).numpy())


def test_detr_like_workload_matches_scipy():
  """Targets padded at the end, 0 to all slots valid, matched to every query group."""
  rng = np.random.default_rng(3)
  cost = rng.normal(size=WIDE).astype(np.float32)
  valid = np.arange(WIDE[1]) < np.array([0, 2, 5, 6])[:, None]
  _check_optimal(cost, valid, _jit_solve(cost, valid).numpy())


def test_batched_equals_per_problem():
  rng = np.random.default_rng(11)
  cost = rng.integers(0, 4, size=WIDE).astype(np.float32)
  valid = rng.random(WIDE[:2]) < 0.8
  batched = _jit_solve(cost, valid).numpy()
  for p in range(WIDE[0]):
    alone = np.zeros(WIDE, np.float32)
    alone[0] = cost[p]
    only = np.zeros(WIDE[:2], bool)
    only[0] = valid[p]
    np.testing.assert_array_equal(batched[p], _jit_solve(alone, only).numpy()[0])


def test_rows_with_a_single_finite_entry():
  """Each row allows one column only (inf or NaN elsewhere): the unique feasible assignment, as scipy finds it."""
  rng = np.random.default_rng(5)
  problems, rows, cols = WIDE
  cost = np.full(WIDE, np.inf, np.float32)
  cost[1::2] = np.nan  # NaN is forbidden too
  for p in range(problems):
    cost[p, np.arange(rows), rng.permutation(cols)[:rows]] = rng.normal(size=rows)
  valid = np.ones(WIDE[:2], bool)
  assignment = _jit_solve(cost, valid).numpy()
  np.testing.assert_array_equal(assignment, matching.linear_sum_assignment(cost, valid).numpy())
  for p in range(problems):
    _, expected = scipy.optimize.linear_sum_assignment(np.where(np.isnan(cost[p]), np.inf, cost[p]))
    np.testing.assert_array_equal(assignment[p], expected)


def _min_count(mask):
  """Fewest entries of `mask` any complete assignment must use."""
  r, c = scipy.optimize.linear_sum_assignment(mask.astype(np.float64))
  return int(mask[r, c].sum())


def test_infeasible_uses_fewest_forbidden_pairs_and_no_nan():
  rng = np.random.default_rng(9)
  problems, rows, _ = WIDE
  cost = rng.normal(size=WIDE).astype(np.float32)
  forbidden = rng.random(WIDE) < 0.6
  forbidden[0, :, 3:] = True  # 6 rows but only 3 allowed columns
  forbidden[1, 2] = True  # a row with no allowed column
  forbidden[2] = True  # a problem made only of forbidden pairs
  cost[forbidden] = np.where(rng.random(forbidden.sum()) < 0.5, np.inf, np.nan)
  valid = np.ones(WIDE[:2], bool)
  assignment = _jit_solve(cost, valid).numpy()
  for p in range(problems):
    chosen = assignment[p]
    assert np.all(chosen >= 0) and len(set(chosen.tolist())) == rows
    assert forbidden[p][np.arange(rows), chosen].sum() == _min_count(forbidden[p])
  # Among assignments with the fewest forbidden pairs, problem 0 still minimises the finite part.
  finite_part = np.where(forbidden[0], 0.0, cost[0]).astype(np.float64)
  r, c = scipy.optimize.linear_sum_assignment(np.where(forbidden[0], 1e6, cost[0]).astype(np.float64))
  np.testing.assert_allclose(finite_part[np.arange(rows), assignment[0]].sum(), finite_part[r, c].sum(), rtol=1e-5)


def test_minus_inf_pairs_are_preferred():
  rng = np.random.default_rng(13)
  problems, rows, _ = WIDE
  cost = rng.normal(size=WIDE).astype(np.float32)
  preferred = rng.random(WIDE) < 0.1
  cost[preferred] = -np.inf
  valid = np.ones(WIDE[:2], bool)
  assignment = _jit_solve(cost, valid).numpy()
  for p in range(problems):
    assert preferred[p][np.arange(rows), assignment[p]].sum() == -_min_count(-preferred[p].astype(np.int64))
    rest = np.where(preferred[p], -1e6, cost[p]).astype(np.float64)
    r, c = scipy.optimize.linear_sum_assignment(rest)
    np.testing.assert_allclose(rest[np.arange(rows), assignment[p]].sum(), rest[r, c].sum(), rtol=1e-6)


def test_invalid_rows_may_hold_garbage():
  rng = np.random.default_rng(17)
  cost = rng.normal(size=WIDE).astype(np.float32)
  valid = rng.random(WIDE[:2]) < 0.5
  garbage = cost.copy()
  garbage[~valid] = np.nan
  garbage[~valid, 0] = -np.inf
  assignment = _jit_solve(garbage, valid).numpy()
  np.testing.assert_array_equal(assignment, _jit_solve(cost, valid).numpy())
  _check_optimal(cost, valid, assignment)


def test_all_padding_empty_and_zero_problem_batches():
  np.testing.assert_array_equal(_jit_solve(np.zeros(WIDE, np.float32), np.zeros(WIDE[:2], bool)).numpy(), -1)
  assert matching.linear_sum_assignment(np.zeros((3, 0, 5), np.float32)).shape == (3, 0)
  assert _jit_solve(np.zeros((0, 4, 6), np.float32), np.zeros((0, 4), bool)).shape == (0, 4)


def test_default_row_valid_and_bfloat16_input():
  rng = np.random.default_rng(19)
  cost = tf.constant(rng.normal(size=WIDE), tf.bfloat16)
  compiled = tf.function(matching.linear_sum_assignment, jit_compile=True)(cost).numpy()
  _check_optimal(tf.cast(cost, tf.float32).numpy(), np.ones(WIDE[:2], bool), compiled)


def test_loop_stops_after_the_work_is_done():
  """No search when every row's cheapest column is free; few trips when rows compete."""
  problems, rows, cols = WIDE
  cost = np.tile(np.arange(cols, dtype=np.float32), (problems, rows, 1))  # every row prefers column 0 ...
  cost[:, np.arange(rows), np.arange(rows)] = -1.0  # ... unless its own column is cheaper
  valid = np.arange(rows) < 3
  valid = np.broadcast_to(valid, WIDE[:2])
  assignment, trips = _jit_solve_with_trips(cost, valid)
  np.testing.assert_array_equal(assignment.numpy()[:, :3], np.tile(np.arange(3), (problems, 1)))
  np.testing.assert_array_equal(trips.numpy(), [1, 0])
  conflict = np.tile(np.arange(cols, dtype=np.float32), (problems, rows, 1))  # all rows want column 0
  assignment, trips = _jit_solve_with_trips(conflict, valid)
  _check_optimal(conflict, valid, assignment.numpy())
  assert 0 < trips.numpy()[1] <= 3 * 3


def test_larger_problems_need_row_reduction_and_searches():
  """48 x 48 problems: the greedy start leaves many rows free, so the row reduction (queue, bids, bumped rows,
  second choices, price wars) and several lanes of searches all run; ties and equal-cost assignments included."""
  rng = np.random.default_rng(23)
  shape = (3, 48, 48)
  for kind in ("uniform", "lowrank", "ties", "integers"):
    if kind == "uniform":
      cost = rng.random(shape)
    elif kind == "lowrank":  # c[i, j] = a[i] + b[j]: every complete assignment is optimal
      cost = rng.random(shape[:2] + (1,)) + rng.random(shape[:1] + (1,) + shape[2:])
    else:
      cost = _costs(kind, shape, rng)
    cost = cost.astype(np.float32)
    valid = np.ones(shape[:2], bool)
    valid[2, ::3] = False  # one rectangular problem
    assignment, trips = _jit_solve_with_trips(cost, valid)
    _check_optimal(cost, valid, assignment.numpy())
    assert trips.numpy()[1] > 0
  np.testing.assert_array_equal(matching.linear_sum_assignment(cost, valid).numpy(), assignment.numpy())


def test_many_problems_across_greedy_chunks():
  """More valid rows than one greedy trip reads: problems straddle the chunks, padding rows are skipped."""
  rng = np.random.default_rng(29)
  cost = rng.normal(size=(128, 6, 15)).astype(np.float32)
  valid = np.arange(6) < rng.integers(0, 7, size=(128, 1))  # padded targets, 0 to 6 per problem (> 256 rows)
  valid[5, [1, 3]] = False  # and a problem with holes
  assignment, trips = _jit_solve_with_trips(cost, valid)
  _check_optimal(cost, valid, assignment.numpy())
  assert trips.numpy()[0] >= 2


@pytest.mark.parametrize("bad", [
    dict(cost=np.zeros((4,), np.float32)),
    dict(cost=np.zeros((2, 5, 4), np.float32)),
    dict(cost=np.zeros((2, 3, 4), np.int32)),
    dict(cost=np.zeros((2, 3, 4), np.float32), row_valid=np.ones((2, 4), bool)),
    dict(cost=np.zeros((2, 3, 4), np.float32), row_valid=np.ones((2, 3), np.int32)),
])
def test_bad_arguments_raise_value_error(bad):
  with pytest.raises(ValueError, match="cost|row_valid"):
    matching.linear_sum_assignment(**bad)
