"""Shared helpers of the pix2seq tests, as the `p2s` fixture: a tiny model, a batch, rewarded samples."""

import types

import numpy as np
import pytest
import tensorflow as tf

from tfreward.models.pix2seq import Pix2Seq, SamplingOptions
from tfreward.ops import sequence

IMAGE_SIZE = (32, 32)
TINY = dict(max_level=16, num_boxes=3, encoder_width=8, encoder_stages=2, encoder_layers=1, dim=16, decoder_layers=1,
            num_heads=2, mlp_ratio=2, num_samples=3)
LAYOUT = dict(max_level=16, max_conf=2, num_cls=3)


def batch(n=4, seed=0, objects=3):
  """Random images [n, 32, 32, 3] uint8 and labels of up to `objects` boxes (image 0 has none)."""
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 255, (n, *IMAGE_SIZE, 3)).astype(np.uint8)
  lo = rng.uniform(0, 0.5, (n, objects, 2))
  boxes = np.concatenate([lo, lo + rng.uniform(0.1, 0.5, (n, objects, 2))], -1).astype(np.float32)
  valid = np.arange(objects)[None, :] < rng.integers(1, objects + 1, (n, 1))
  valid[0] = False  # an image without objects
  classes = np.where(valid, rng.integers(0, 3, (n, objects)), -1).astype(np.int32)
  return images, {"boxes": boxes * valid[..., None], "classes": classes, "valid": valid}


def model(mode="reward", **options):
  """A built tiny Pix2Seq (3 classes, 32 x 32 images, 3 box slots, 3 samples)."""
  built = Pix2Seq({"mode": mode, **TINY, **options}, num_classes=3, image_size=IMAGE_SIZE)
  built.build_for_training()
  return built


def rewarded_samples(model, images, labels, seed):
  """[B, 3, 18] samples of `model` whose sample 0 holds the ground-truth boxes (rewarded: non-zero advantages); its
  empty slots keep the model's own tokens, so every token is of its position's kind (finite log-probabilities)."""
  samples = model.sample(model.encoder(images), SamplingOptions(), num_samples=3, seed=tf.constant(seed))["tokens"]
  gt = sequence.boxes_to_sequence(labels["boxes"], labels["classes"], labels["valid"], order="fixed", seq_len=18,
                                  **LAYOUT)
  present = tf.repeat(gt[:, 5::6] > 0, 6, axis=1)  # [B, 18] slots holding an object
  first = tf.where(present, gt, samples[:, 0])
  return tf.concat([first[:, None], samples[:, 1:]], axis=1)


def finite(values):
  return all(np.isfinite(np.asarray(tf.convert_to_tensor(v))).all() for v in values)


@pytest.fixture
def p2s():
  return types.SimpleNamespace(IMAGE_SIZE=IMAGE_SIZE, TINY=TINY, LAYOUT=LAYOUT, batch=batch, model=model,
                               rewarded_samples=rewarded_samples, finite=finite)
