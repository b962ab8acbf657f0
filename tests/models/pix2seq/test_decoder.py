"""Tests for tfreward.models.pix2seq.decoder: cached decoding equals teacher forcing, box-guided cross-attention."""

import numpy as np
import tensorflow as tf

from tfreward.models.pix2seq import SamplingOptions
from tfreward.models.pix2seq.decoder import decode
from tfreward.ops import sequence


def test_cached_decoding_equals_teacher_forcing(p2s):
  model = p2s.model("mle")
  memory = model.encoder(tf.constant(p2s.batch()[0]))
  out = decode(model.decoder, memory, SamplingOptions(), layout=model.layout, num_samples=2,
               seed=tf.constant([0, 1]), return_logits=True)
  tokens = tf.reshape(out["tokens"], [8, model.seq_len])
  forced = model.decoder(model.decoder.shift_right(tokens), tf.repeat(memory, 2, axis=0))
  np.testing.assert_allclose(tf.reshape(out["logits"], forced.shape), forced, rtol=1e-4, atol=1e-5)


def test_samples_of_an_image_share_its_memory_exactly_as_with_a_repeated_memory(p2s):
  # The decoder reads one memory per image for all its G sequences (no [B * G] copy of the memory, its keys or its
  # values); the result is what each sequence gets from its own copy, box guidance included, eagerly and under XLA.
  model = p2s.model("mle", box_attention=True)
  memory = model.encoder(tf.constant(p2s.batch()[0]))  # [4, S, D]
  rng = np.random.default_rng(0)
  lo = rng.uniform(0, 0.6, (12, 3, 2))
  boxes = np.concatenate([lo, lo + rng.uniform(0.1, 0.4, (12, 3, 2))], -1).astype(np.float32)  # 12 different
  tokens = sequence.boxes_to_sequence(boxes, rng.integers(0, 3, (12, 3)), np.ones((12, 3), bool),
                                      seq_len=model.seq_len, order="fixed", **p2s.LAYOUT)
  inputs = model.decoder.shift_right(tokens)  # row 3 b + g: sequence g of image b
  repeated = model.decoder(inputs, tf.repeat(memory, 3, axis=0))
  shared = model.decoder(inputs, memory)
  compiled = tf.function(lambda i, m: model.decoder(i, m), jit_compile=True)(inputs, memory)
  np.testing.assert_allclose(shared, repeated, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(compiled, repeated, rtol=1e-4, atol=1e-4)


def test_greedy_decoding_ignores_the_sampling_settings(p2s):
  model = p2s.model("mle")
  memory = model.encoder(tf.constant(p2s.batch()[0]))
  greedy = [model.sample(memory, SamplingOptions(greedy=True, temperature=t, top_k=k), num_samples=1)["tokens"]
            for t, k in ((1.0, 0), (0.3, 2))]
  np.testing.assert_array_equal(greedy[0], greedy[1])


def test_box_guided_cross_attention_reads_inside_the_box(p2s):
  model = p2s.model("mle")  # one decoder layer: memory reaches a position only through its own cross-attention
  box = sequence.boxes_to_sequence([[[0.0, 0.0, 0.3, 0.3]]], [[1]], [[True]], seq_len=18, order="fixed",
                                   **p2s.LAYOUT)
  inputs = model.decoder.shift_right(box)
  memory = tf.random.normal([1, 64, 16], seed=0)  # 8 x 8 cells; centres of rows and columns 0..2 are inside
  inside = np.zeros([8, 8], bool)
  inside[:3, :3] = True
  base = model.decoder(inputs, memory).numpy()
  for region, changes in ((~inside, False), (inside, True)):
    bump = tf.constant(np.where(region.reshape(1, 64, 1), 5.0, 0.0), tf.float32)
    moved = model.decoder(inputs, memory + bump).numpy()
    assert np.allclose(moved[0, 4:6], base[0, 4:6], atol=1e-5) != changes  # class and conf of slot 0
    assert not np.allclose(moved[0, :4], base[0, :4], atol=1e-5)  # coordinates see the whole image
