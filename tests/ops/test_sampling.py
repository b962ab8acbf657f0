"""Tests for tfreward.ops.sampling: kind constraints, filtering, Gumbel sampling, N samples, cache, XLA."""

import numpy as np
import pytest
import tensorflow as tf

from tfreward.ops import sampling
from tfreward.ops import sequence

LAYOUT = dict(max_level=9, max_conf=2, num_cls=4)  # vocab: conf 0..2, coords 3..12, classes 13..16
VOCAB = sequence.TokenLayout(**LAYOUT).vocab_size
START = VOCAB


def _bigram_step(table, offsets_scale=3.0):
  """A cached toy decoder: logits = table[previous token] + scale * one_hot(cache offset + position)."""
  table = tf.constant(table, tf.float32)  # [V + 1, V]

  def step(tokens, position, cache):
    target = (cache["offset"] + position) % VOCAB
    logits = tf.gather(table, tokens) + offsets_scale * tf.one_hot(target, VOCAB)
    return logits, {"offset": cache["offset"], "count": cache["count"] + 1}

  return step


def _cache(batch):
  return {"offset": tf.range(batch, dtype=tf.int32) * 2, "count": tf.zeros([batch], tf.int32)}


def _table(seed=0):
  return np.random.default_rng(seed).normal(size=(VOCAB + 1, VOCAB)).astype(np.float32)


def _sample(batch=3, seq_len=12, **kwargs):
  return sampling.sample_sequences(_bigram_step(_table()), _cache(batch), seq_len=seq_len, start_token=START,
                                   **LAYOUT, **kwargs)


@pytest.mark.parametrize("greedy", [True, False])
def test_every_position_holds_a_token_of_its_kind(greedy):
  out = _sample(seq_len=15, num_samples=4, greedy=greedy, seed=[1, 2])
  tokens = out["tokens"].numpy()
  assert tokens.shape == (3, 4, 15) and tokens.dtype == np.int32
  allowed = sequence.allowed_tokens(15, **LAYOUT).numpy()  # [L, V]
  for t in range(15):
    assert allowed[t][tokens[..., t]].all(), t


def test_greedy_matches_a_python_reference_loop():
  table = _table()
  out = _sample(seq_len=12, greedy=True, return_logits=True)
  allowed = sequence.allowed_tokens(12, **LAYOUT).numpy()
  for b in range(3):
    previous, expected, expected_logits = START, [], []
    for t in range(12):
      logits = table[previous] + 3.0 * np.eye(VOCAB)[(2 * b + t) % VOCAB]
      expected_logits.append(logits)
      previous = int(np.argmax(np.where(allowed[t], logits, -np.inf)))
      expected.append(previous)
    np.testing.assert_array_equal(out["tokens"][b, 0], expected)
    np.testing.assert_allclose(out["logits"][b, 0], np.stack(expected_logits), rtol=1e-6)


def test_samples_repeat_the_cache_of_their_image():
  # Logits peak at the token nearest to each image's cached centre, so every sample of an image is the same.
  def step(tokens, position, cache):
    del tokens, position
    distance = tf.abs(tf.range(VOCAB, dtype=tf.float32)[None, :] - cache["centre"][:, None])
    return -100.0 * distance, cache

  cache = {"centre": tf.constant([2.0, 9.0])}
  out = sampling.sample_sequences(step, cache, seq_len=6, start_token=START, num_samples=3, seed=[0, 1],
                                  **LAYOUT)["tokens"].numpy()
  np.testing.assert_array_equal(out[0], [[3, 3, 3, 3, 13, 2]] * 3)
  np.testing.assert_array_equal(out[1], [[9, 9, 9, 9, 13, 2]] * 3)


def test_seeds_reproduce_and_differ():
  a = _sample(num_samples=5, seed=[3, 4])["tokens"].numpy()
  b = _sample(num_samples=5, seed=[3, 4])["tokens"].numpy()
  c = _sample(num_samples=5, seed=[3, 5])["tokens"].numpy()
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  assert len({tuple(s) for s in a.reshape(-1, 12)}) > 10  # samples of one image differ from each other


def test_eager_equals_xla():
  kwargs = dict(num_samples=4, seed=tf.constant([7, 8], tf.int64), temperature=0.7, top_k=5, top_p=0.9,
                return_logits=True)
  eager = _sample(**kwargs)
  compiled = tf.function(lambda: _sample(**kwargs), jit_compile=True)()
  np.testing.assert_array_equal(compiled["tokens"], eager["tokens"])
  np.testing.assert_allclose(compiled["logits"], eager["logits"], rtol=1e-6, atol=1e-6)


def test_gumbel_sampling_follows_the_softmax():
  logits = tf.constant([[0.0, 1.0, 2.0, -1.0, -30.0]] * 20000)
  tokens = sampling.gumbel_sample(logits, tf.constant([5, 6])).numpy()
  freq = np.bincount(tokens, minlength=5) / tokens.size
  np.testing.assert_allclose(freq, tf.nn.softmax(logits[0]).numpy(), atol=0.01)


def test_filter_logits_top_k_top_p_and_temperature():
  logits = tf.constant([[2.0, 1.0, 0.0, -1.0, tf.float32.min]])
  probs = tf.nn.softmax(logits[0]).numpy()  # about .644, .237, .087, .032, 0
  kept = lambda out: (out.numpy()[0] > tf.float32.min).tolist()
  assert kept(sampling.filter_logits(logits, top_k=2)) == [True, True, False, False, False]
  assert kept(sampling.filter_logits(logits, top_p=0.5)) == [True, False, False, False, False]
  assert kept(sampling.filter_logits(logits, top_p=0.9)) == [True, True, True, False, False]
  assert probs[:2].sum() < 0.9 < probs[:3].sum()
  np.testing.assert_allclose(sampling.filter_logits(logits, temperature=0.5).numpy()[0, :4], [4.0, 2.0, 0.0, -2.0])
  assert np.isfinite(sampling.filter_logits(logits, temperature=0.5).numpy()).all()
  # Filtering never removes every token: the most likely one always stays.
  assert kept(sampling.filter_logits(logits, top_k=1, top_p=1e-6)) == [True, False, False, False, False]


def test_constrained_positions_with_peaked_wrong_kind_logits():
  # The decoder prefers token 0 (a conf token) everywhere; coordinate and class positions must still get their kind.
  table = np.full((VOCAB + 1, VOCAB), -5.0, np.float32)
  table[:, 0] = 50.0
  out = sampling.sample_sequences(_bigram_step(table, 0.0), _cache(1), seq_len=6, start_token=START, seed=[0, 0],
                                  **LAYOUT)["tokens"].numpy()[0, 0]
  kinds = sequence.token_kinds(6).numpy()
  assert out[kinds == sequence.CONF].tolist() == [0]
  assert all(3 <= t <= 12 for t in out[kinds == sequence.COORD])
  assert 13 <= out[kinds == sequence.CLASS][0] <= 16


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_samples=0), "num_samples"),
    (dict(seq_len=0), "seq_len"),
    (dict(temperature=0.0), "temperature"),
    (dict(top_k=-1), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
])
def test_bad_arguments(kwargs, match):
  args = dict(seq_len=6, seed=[0, 0])
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    _sample(**args)


def test_sampling_without_a_seed_is_an_error():
  with pytest.raises(ValueError, match="seed"):
    _sample(seq_len=6)


def test_stateless_uniform_is_uniform_and_identical_under_xla():
  seed = tf.constant([11, -3], tf.int64)
  eager = sampling.stateless_uniform([50, 400], seed, -1.0, 3.0).numpy()
  compiled = tf.function(lambda s: sampling.stateless_uniform([50, 400], s, -1.0, 3.0), jit_compile=True)(seed)
  np.testing.assert_array_equal(compiled.numpy(), eager)
  assert eager.shape == (50, 400) and eager.min() >= -1.0 and eager.max() < 3.0
  counts = np.histogram(eager, bins=10, range=(-1.0, 3.0))[0]
  np.testing.assert_allclose(counts / eager.size, 0.1, atol=0.01)
  assert abs(np.corrcoef(eager.ravel()[:-1], eager.ravel()[1:])[0, 1]) < 0.02  # neighbours are independent
  other = sampling.stateless_uniform([50, 400], tf.constant([11, -2], tf.int64), -1.0, 3.0).numpy()
  assert abs(np.corrcoef(eager.ravel(), other.ravel())[0, 1]) < 0.02  # nearby seeds are independent


def test_fold_in_and_split_agree_under_xla_and_separate_streams():
  def derive(seed, step):
    child = sampling.fold_in(sampling.fold_in(seed, step), 1)
    return child, sampling.split(child, 3), sampling.stateless_uniform([8], sampling.split(child, 3)[2])

  seed, step = tf.constant([4, 2], tf.int64), tf.constant(7, tf.int64)
  for eager, compiled in zip(derive(seed, step), tf.function(derive, jit_compile=True)(seed, step)):
    np.testing.assert_array_equal(compiled, eager)
  seeds = [tuple(sampling.fold_in(seed, d).numpy()) for d in range(50)]
  seeds += [tuple(s) for s in sampling.split(seed, 3).numpy()] + [tuple(sampling.fold_in([4, 3], 0).numpy())]
  assert len(set(seeds)) == 51  # split(seed, 3) repeats fold_in(seed, 0..2); everything else differs
  assert sampling.fold_in(tf.constant([4, 2], tf.int32), 5).dtype == tf.int64
