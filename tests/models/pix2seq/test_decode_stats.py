"""Tests for tfreward.models.pix2seq.decode_stats: emitted, found and duplicate counts of decoded sequences, XLA."""

import numpy as np
import pytest
import tensorflow as tf

from tfreward.models.pix2seq import decode_stats
from tfreward.ops import sequence

LAYOUT = dict(max_level=100, max_conf=2, num_cls=3)


def _seq(objects, slots):
  """objects: (yxyx, class, conf) triples -> [L] tokens, padded with all-zero slots."""
  boxes = np.zeros([1, slots, 4], np.float32)
  classes = np.zeros([1, slots], np.int32)
  valid = np.zeros([1, slots], bool)
  for i, (box, cls, _) in enumerate(objects):
    boxes[0, i], classes[0, i], valid[0, i] = box, cls, True
  tokens = sequence.boxes_to_sequence(boxes, classes, valid, order="fixed", seq_len=6 * slots, **LAYOUT).numpy()
  for i, (_, _, conf) in enumerate(objects):
    tokens[0, 6 * i + 5] = conf  # boxes_to_sequence writes max_conf; conf 0 marks a slot the model left empty
  return tokens[0]


A, B, C = [0.1, 0.1, 0.3, 0.3], [0.5, 0.5, 0.8, 0.8], [0.1, 0.6, 0.2, 0.9]
GT = [(A, 0, 2), (B, 1, 2), (C, 2, 2)]
PREDICTIONS = {
    "perfect": ([(A, 0, 2), (B, 1, 2), (C, 2, 2)], dict(emitted=3, objects=3, found=3, duplicates=0)),
    "stops early": ([(A, 0, 2)], dict(emitted=1, objects=3, found=1, duplicates=0)),
    "repeats": ([(A, 0, 2), (A, 0, 1), ([0.11, 0.1, 0.3, 0.3], 0, 2), (B, 1, 2)],
                dict(emitted=4, objects=3, found=2, duplicates=2)),
    "wrong class, empty slot": ([(A, 1, 2), (B, 1, 0)], dict(emitted=1, objects=3, found=0, duplicates=0)),
    "misplaced": ([([0.6, 0.1, 0.7, 0.2], 0, 2)], dict(emitted=1, objects=3, found=0, duplicates=0)),
}


@pytest.mark.parametrize("jit", [False, True])
def test_decode_statistics_counts(jit):
  names = list(PREDICTIONS)
  tokens = np.stack([_seq(PREDICTIONS[n][0], 5) for n in names])
  gt = np.stack([_seq(GT, 4)] * len(names))
  fn = tf.function(lambda t, g: decode_stats.decode_statistics(t, g, **LAYOUT), jit_compile=True) if jit else (
      lambda t, g: decode_stats.decode_statistics(t, g, **LAYOUT))
  got = {k: v.numpy() for k, v in fn(tf.constant(tokens), tf.constant(gt)).items()}
  for i, name in enumerate(names):
    assert {k: int(got[k][i]) for k in decode_stats.STATISTICS} == PREDICTIONS[name][1], name


def test_decode_statistics_image_without_objects():
  got = decode_stats.decode_statistics(_seq([(A, 0, 2)], 2)[None], _seq([], 2)[None], **LAYOUT)
  assert {k: int(v[0]) for k, v in got.items()} == dict(emitted=1, objects=0, found=0, duplicates=0)
  summary = decode_stats.summarize({k: int(v[0]) for k, v in got.items()}, 1)
  assert summary["recall50"] == 0.0 and summary["precision50"] == 0.0 and summary["duplicate_rate"] == 0.0


def test_summarize_rates():
  summary = decode_stats.summarize(dict(emitted=8, objects=10, found=6, duplicates=2), 2)
  assert summary == dict(emitted_per_image=4.0, objects_per_image=5.0, recall50=0.6, precision50=0.75,
                         duplicate_rate=0.25)


def test_decode_statistics_rejects_samples_axis():
  with pytest.raises(ValueError, match=r"\[B, L\]"):
    decode_stats.decode_statistics(np.zeros([2, 1, 12], np.int32), np.zeros([2, 12], np.int32), **LAYOUT)
