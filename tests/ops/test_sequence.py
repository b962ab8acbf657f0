"""Sequence tokenizer: layout, round trips, ordering, padding, truncation, clipping, scores, kind masks, XLA."""

import os

import numpy as np
import pytest
import tensorflow as tf

from tfreward.ops import sequence

PAPER = dict(max_level=1000, max_conf=2, num_cls=80)
SMALL = dict(max_level=10, max_conf=2, num_cls=3)
GOLDEN = os.path.join(os.path.dirname(__file__), os.pardir, "data", "detection_reward", "cases.npz")


def _objects(seed, b=3, m=7, num_cls=80, p_valid=0.7):
  rng = np.random.default_rng(seed)
  lo = rng.random((b, m, 2)) * 0.6
  hi = lo + rng.random((b, m, 2)) * 0.4
  boxes = np.concatenate([lo, hi], -1).astype(np.float32)  # [ymin, xmin, ymax, xmax]
  classes = rng.integers(0, num_cls, (b, m)).astype(np.int32)
  valid = rng.random((b, m)) < p_valid
  valid[0, :] = True
  classes[~valid] = -1
  return boxes, classes, valid


def _encode(boxes, classes, valid, jit=False, **kw):
  config = {**PAPER, **kw}
  fn = lambda b, c, v: sequence.boxes_to_sequence(b, c, v, **config)  # noqa: E731
  if jit:
    fn = tf.function(fn, jit_compile=True)
  return fn(tf.constant(boxes), tf.constant(classes), tf.constant(valid)).numpy()


def _decode(tokens, jit=False, **kw):
  config = {**PAPER, **kw}
  fn = lambda t: sequence.sequence_to_detections(t, **config)  # noqa: E731
  if jit:
    fn = tf.function(fn, jit_compile=True)
  return {k: v.numpy() for k, v in fn(tf.constant(tokens)).items()}


def test_paper_layout():
  layout = sequence.TokenLayout(**PAPER)
  assert layout.token_range(sequence.CONF) == (0, 3)
  assert layout.token_range(sequence.COORD) == (3, 1004)
  assert layout.token_range(sequence.CLASS) == (1004, 1084)
  assert layout.vocab_size == 1084
  with pytest.raises(ValueError, match="max_level"):
    sequence.TokenLayout(0, 2, 80)
  with pytest.raises(ValueError, match="kind"):
    layout.token_range(7)


def test_fixed_order_roundtrip_within_half_a_bin():
  boxes, classes, valid = _objects(0)
  tokens = _encode(boxes, classes, valid, order="fixed", seq_len=60)
  assert tokens.dtype == np.int32 and tokens.shape == (3, 60)
  out = _decode(tokens)
  for b in range(3):
    k = valid[b].sum()
    np.testing.assert_allclose(out["boxes"][b, :k], boxes[b][valid[b]], atol=0.5 / 1000 + 1e-6)
    np.testing.assert_array_equal(out["classes"][b, :k], classes[b][valid[b]])
    assert out["valid"][b, :k].all() and not out["valid"][b, k:].any()
    np.testing.assert_array_equal(out["classes"][b, k:], -1)
    np.testing.assert_array_equal(out["boxes"][b, k:], 0.0)
    np.testing.assert_array_equal(tokens[b, 6 * k:], 0)  # padding slots are all-zero
    np.testing.assert_array_equal(tokens[b, 5:6 * k:6], 2)  # ground truth gets the top conf token
  np.testing.assert_array_equal(out["scores"], np.where(out["valid"], 1.0, 0.0))


def test_quantisation_error_bound_on_a_coarse_grid():
  boxes = np.array([[[0.04, 0.05, 0.06, 0.951], [0.0, 0.33, 1.0, 0.67]]], np.float32)
  out = _decode(_encode(boxes, np.array([[0, 2]]), np.array([[True, True]]), order="fixed", seq_len=12, **SMALL),
                **SMALL)
  np.testing.assert_allclose(out["boxes"], np.round(boxes * 10) / 10, atol=1e-6)
  assert np.abs(out["boxes"] - boxes).max() <= 0.5 / 10 + 1e-6


def test_out_of_range_inputs_are_clipped():
  boxes = np.array([[[-0.5, 0.2, 1.5, 0.8]]], np.float32)
  tokens = _encode(boxes, np.array([[99]]), np.array([[True]]), order="fixed", seq_len=6, **SMALL)
  np.testing.assert_array_equal(tokens, [[3, 5, 13, 11, 16, 2]])


def test_random_order_is_a_seeded_permutation_of_the_valid_objects():
  boxes, classes, valid = _objects(1, b=2, m=9)
  a = _encode(boxes, classes, valid, order="random", seed=(3, 4), seq_len=60)
  again = _encode(boxes, classes, valid, order="random", seed=(3, 4), seq_len=60)
  other = _encode(boxes, classes, valid, order="random", seed=(5, 6), seq_len=60)
  fixed = _encode(boxes, classes, valid, order="fixed", seq_len=60)
  np.testing.assert_array_equal(a, again)
  assert not np.array_equal(a, other) and not np.array_equal(a, fixed)
  for b in range(2):
    slots = lambda t: sorted(map(tuple, t.reshape(-1, 6).tolist()))  # noqa: E731
    assert slots(a[b]) == slots(fixed[b])  # same objects, same padding, other order
    k = valid[b].sum()
    assert (a[b, 5:6 * k:6] == 2).all() and (a[b, 6 * k:] == 0).all()  # objects first, padding after


def test_random_order_with_a_generator_and_int_seed():
  boxes, classes, valid = _objects(2)
  fixed = _encode(boxes, classes, valid, order="fixed", seq_len=60)
  rng = tf.random.Generator.from_seed(7)
  runs = [_encode(boxes, classes, valid, order="random", seq_len=60, rng=rng, jit=jit) for jit in (False, True, True)]
  assert not np.array_equal(runs[1], runs[2])  # the generator advances, also under XLA
  for tokens in runs + [_encode(boxes, classes, valid, order="random", seq_len=60, seed=11)]:
    for b in range(3):
      assert sorted(map(tuple, tokens[b].reshape(-1, 6).tolist())) == sorted(
          map(tuple, fixed[b].reshape(-1, 6).tolist()))


def test_truncation_when_more_objects_than_slots():
  boxes, classes, valid = _objects(3, b=2, m=8, p_valid=1.0)
  valid[1, 0] = False
  fixed = _encode(boxes, classes, valid, order="fixed", seq_len=18)
  assert fixed.shape == (2, 18)
  out = _decode(fixed)
  np.testing.assert_array_equal(out["classes"][0], classes[0, :3])
  np.testing.assert_array_equal(out["classes"][1], classes[1, 1:4])  # the padding object is skipped
  rand = _encode(boxes, classes, valid, order="random", seed=(0, 1), seq_len=18).reshape(2, 3, 6)
  everything = _encode(boxes, classes, valid, order="fixed", seq_len=48).reshape(2, 8, 6)
  for b in range(2):
    kept = [tuple(s) for s in rand[b].tolist()]
    assert len(set(kept)) == 3 and set(kept) <= {tuple(s) for s in everything[b].tolist() if s[5] > 0}


def test_no_objects_and_zero_objects():
  boxes, classes, _ = _objects(4, b=2, m=3)
  tokens = _encode(boxes, classes, np.zeros((2, 3), bool), order="random", seed=(1, 1), seq_len=12)
  np.testing.assert_array_equal(tokens, 0)
  out = _decode(tokens)
  assert not out["valid"].any() and np.all(np.isfinite(out["scores"]))
  empty = _encode(np.zeros((2, 0, 4), np.float32), np.zeros((2, 0), np.int32), np.zeros((2, 0), bool),
                  order="fixed", seq_len=12)
  np.testing.assert_array_equal(empty, np.zeros((2, 12)))


def test_decoding_truncates_a_length_not_a_multiple_of_6():
  boxes, classes, valid = _objects(5)
  tokens = _encode(boxes, classes, valid, order="fixed", seq_len=24)
  tail = np.concatenate([tokens, tokens[:, :4]], axis=1)  # a dangling partial box
  got, want = _decode(tail), _decode(tokens)
  assert got["boxes"].shape == (3, 4, 4)
  for key in want:
    np.testing.assert_array_equal(got[key], want[key])


def test_out_of_range_tokens_are_clipped_like_the_reward():
  tokens = np.array([[-7, 2, 1003, 99999, 5000, 1000, 500, 500, 600, 600, 1004, -1]], np.int32)
  out = _decode(tokens)
  np.testing.assert_allclose(out["boxes"][0, 0], [0.0, 0.0, 1.0, 1.0])
  assert out["classes"][0, 0] == 79 and out["valid"][0].tolist() == [True, False]
  assert out["scores"][0, 0] == 1.0  # conf 1000 is clipped to max_conf


def test_valid_slots_agree_with_the_golden_reward():
  """A slot is present exactly where the reference reward's `correct` is non-zero, on every golden case."""
  with np.load(GOLDEN) as z:
    for i in range(int(z["num_cases"])):
      pred, correct = z[f"case{i}_seqs_pred"], z[f"case{i}_correct"]
      out = _decode(pred.reshape(-1, pred.shape[-1]))
      np.testing.assert_array_equal(out["valid"], correct.reshape(out["valid"].shape) > 0)


def test_scores_from_probabilities_and_logits():
  tokens = np.array([[3, 3, 503, 503, 1004, 1, 3, 3, 503, 503, 1004, 2, 0, 0, 0, 0, 0, 0]], np.int32)
  layout = sequence.TokenLayout(**PAPER)
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(1, 18, layout.vocab_size)).astype(np.float32)
  conf = logits[0, 5::6, :3]
  p = np.exp(conf) / np.exp(conf).sum(-1, keepdims=True)  # softmax over the conf tokens
  want = np.where([True, True, False], p[:, 2], 0.0)  # expected IoU: level 2 stands for IoU 1, level 1 for 0
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  for jit in (False, True):
    for kw in (dict(logits=logits), dict(token_probs=probs)):
      fn = lambda t, **k: sequence.sequence_to_detections(t, **k, **PAPER)  # noqa: E731
      if jit:
        fn = tf.function(fn, jit_compile=True)
      out = fn(tf.constant(tokens), **{k: tf.constant(v) for k, v in kw.items()})
      np.testing.assert_allclose(out["scores"].numpy()[0], want, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(_decode(tokens)["scores"], [[0.0, 1.0, 0.0]])
  # max_conf = 4: levels 1..4 stand for IoU 0, 1/3, 2/3, 1.
  four = dict(max_level=1000, max_conf=4, num_cls=80)
  probs4 = np.zeros((1, 6, 4 + 1 + 1001 + 80), np.float32)
  probs4[0, 5, :5] = [0.0, 0.2, 0.2, 0.2, 0.4]
  out = sequence.sequence_to_detections(np.array([[5, 5, 9, 9, 1006, 3]]), token_probs=probs4, **four)
  np.testing.assert_allclose(out["scores"].numpy(), [[0.2 / 3 + 0.4 / 3 + 0.4]], rtol=1e-6)


def test_xla_equals_eager_and_batched_equals_per_image():
  boxes, classes, valid = _objects(6, b=4, m=12)
  for order, kw in (("fixed", {}), ("random", dict(seed=(2, 3)))):
    eager = _encode(boxes, classes, valid, order=order, seq_len=54, **kw)
    np.testing.assert_array_equal(_encode(boxes, classes, valid, jit=True, order=order, seq_len=54, **kw), eager)
  tokens = _encode(boxes, classes, valid, order="fixed", seq_len=54)
  for b in range(4):
    one = _encode(boxes[b:b + 1], classes[b:b + 1], valid[b:b + 1], order="fixed", seq_len=54)
    np.testing.assert_array_equal(one[0], tokens[b])
  noisy = tokens + np.random.default_rng(0).integers(-5, 5, tokens.shape).astype(np.int32)
  eager, xla = _decode(noisy), _decode(noisy, jit=True)
  for key in eager:
    np.testing.assert_array_equal(xla[key], eager[key])


def test_token_kinds_and_allowed_tokens():
  kinds = sequence.token_kinds(15).numpy()
  np.testing.assert_array_equal(kinds, [0, 0, 0, 0, 1, 2] * 2 + [3, 3, 3])
  allowed = sequence.allowed_tokens(15, **SMALL).numpy()  # vocab: conf 0..2, coords 3..13, classes 14..16
  assert allowed.shape == (15, 17)
  np.testing.assert_array_equal(np.flatnonzero(allowed[0]), np.arange(3, 14))
  np.testing.assert_array_equal(np.flatnonzero(allowed[10]), [14, 15, 16])
  np.testing.assert_array_equal(np.flatnonzero(allowed[11]), [0, 1, 2])
  np.testing.assert_array_equal(np.flatnonzero(allowed[13]), [0])
  logits = tf.random.stateless_normal([2, 15, 17], seed=(0, 0), dtype=tf.bfloat16)
  constrained = tf.function(lambda x: sequence.constrain_logits(x, **SMALL), jit_compile=True)(logits)
  assert constrained.dtype == tf.bfloat16
  picks = tf.argmax(constrained, axis=-1).numpy()
  assert allowed[np.arange(15)[None], picks].all()
  np.testing.assert_array_equal(constrained.numpy()[allowed[None].repeat(2, 0)],
                                logits.numpy()[allowed[None].repeat(2, 0)])


@pytest.mark.parametrize("call,match", [
    (lambda: sequence.boxes_to_sequence(np.zeros((2, 4)), np.zeros((2,), np.int32), np.zeros((2,), bool),
                                        seq_len=12, order="fixed", **PAPER), "boxes must be"),
    (lambda: sequence.boxes_to_sequence(np.zeros((1, 2, 4), np.int32), np.zeros((1, 2), np.int32),
                                        np.zeros((1, 2), bool), seq_len=12, order="fixed", **PAPER), "int32"),
    (lambda: sequence.boxes_to_sequence(np.zeros((1, 2, 4), np.float32), np.zeros((1, 2), np.float32),
                                        np.zeros((1, 2), bool), seq_len=12, order="fixed", **PAPER), "classes"),
    (lambda: sequence.boxes_to_sequence(np.zeros((1, 2, 4), np.float32), np.zeros((1, 2), np.int32),
                                        np.zeros((1, 2), np.int32), seq_len=12, order="fixed", **PAPER), "valid"),
    (lambda: sequence.boxes_to_sequence(np.zeros((1, 2, 4), np.float32), np.zeros((1, 3), np.int32),
                                        np.zeros((1, 2), bool), seq_len=12, order="fixed", **PAPER), "disagree"),
    (lambda: sequence.boxes_to_sequence(np.zeros((1, 2, 4), np.float32), np.zeros((1, 2), np.int32),
                                        np.zeros((1, 2), bool), seq_len=13, order="fixed", **PAPER), "13"),
    (lambda: sequence.boxes_to_sequence(np.zeros((1, 2, 4), np.float32), np.zeros((1, 2), np.int32),
                                        np.zeros((1, 2), bool), seq_len=12, order="sorted", **PAPER), "sorted"),
    (lambda: sequence.boxes_to_sequence(np.zeros((1, 2, 4), np.float32), np.zeros((1, 2), np.int32),
                                        np.zeros((1, 2), bool), seq_len=12, order="random", **PAPER), "seed"),
    (lambda: sequence.sequence_to_detections(np.zeros((1, 2, 12), np.int32), **PAPER), "rank 2"),
    (lambda: sequence.sequence_to_detections(np.zeros((1, 12), np.float32), **PAPER), "integer"),
    (lambda: sequence.sequence_to_detections(np.zeros((1, 12), np.int32), token_probs=np.zeros((1, 12, 3)),
                                             logits=np.zeros((1, 12, 3)), **PAPER), "at most one"),
    (lambda: sequence.sequence_to_detections(np.zeros((1, 12), np.int32), logits=np.zeros((1, 12, 2)), **PAPER),
     "max_conf=2"),
    (lambda: sequence.constrain_logits(np.zeros((1, 12, 5), np.float32), **PAPER), "1084"),
    (lambda: sequence.token_kinds(0), "seq_len"),
    (lambda: sequence.slot_prefixes(np.zeros((1, 10), np.int32)), "multiple of 6"),
    (lambda: sequence.slot_prefixes(np.zeros((1, 12), np.float32)), "integer"),
])
def test_bad_inputs_raise(call, match):
  with pytest.raises(ValueError, match=match):
    call()
