"""The non-finite rule where Pix2Seq, DeepLab and the toy detector compute their loss terms (`compute_losses`): a
NaN or infinite logit makes every returned term NaN, statistics included, eagerly and with jit_compile=True alike,
and the gradients non-finite; sampling inside the step does not crash on it."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.models.deeplab.test_model import IMAGE_SIZE as DEEPLAB_SIZE
from tests.models.deeplab.test_model import NUM_CLASSES, TINY as DEEPLAB_TINY, _batch as deeplab_batch
from tests.models.pix2seq import conftest as p2s
from tests.models.toy_detector.test_model import _batch as toy_batch, _model as toy_model
from tfreward.models.deeplab import DeepLab


def _poison(variable, index, value):
  values = variable.numpy()
  values[index] = value
  variable.assign(values)


def _assert_terms_nan(model, images, labels):
  """Every term NaN eagerly and compiled; the eager gradient has a non-finite entry."""
  images = tf.constant(images)
  step = tf.function(lambda x, y: model.compute_losses(x, y, training=True), jit_compile=True)
  for terms in (model.compute_losses(images, labels, training=True), step(images, labels)):
    assert terms and all(np.isnan(float(v)) for v in terms.values()), terms
  grads, total, _ = model.compute_gradients(images, labels)
  assert np.isnan(float(total))
  assert not np.isfinite(float(tf.linalg.global_norm([g for g in grads if g is not None])))


def _clean_terms_are_finite(model, images, labels):
  terms = model.compute_losses(tf.constant(images), labels, training=True)
  assert all(np.isfinite(float(v)) for v in terms.values()), terms


@pytest.mark.parametrize("options,value", [(dict(mode="mle"), np.nan), (dict(mode="mle"), np.inf),
                                           (dict(mode="reward", mle_weight=0.5), np.nan)],
                         ids=["mle-nan", "mle-inf", "reward with sampling-nan"])
def test_pix2seq(options, value):
  images, labels = p2s.batch(4, seed=3)
  model = p2s.model(**options)
  _clean_terms_are_finite(model, images, labels)
  _poison(model.decoder.head.bias, 5, value)  # a coordinate token's logit, at every position
  _assert_terms_nan(model, images, labels)


@pytest.mark.parametrize("options", [dict(aux_head=True), dict(mode="reward", estimator="reinforce", num_samples=2),
                                     dict(mode="reward", estimator="weighted_ce")],
                         ids=["ce with aux head", "reinforce", "weighted_ce"])
def test_deeplab(options):
  keras.utils.set_random_seed(0)
  model = DeepLab({**DEEPLAB_TINY, "dropout": 0.0, **options}, num_classes=NUM_CLASSES, image_size=DEEPLAB_SIZE)
  model.build_for_training()
  images, labels = deeplab_batch()
  _clean_terms_are_finite(model, images, labels)
  _poison(model.head.classifier.bias, 1, np.nan)
  _assert_terms_nan(model, images, labels)


def test_deeplab_infinite_auxiliary_logit():
  keras.utils.set_random_seed(0)
  model = DeepLab({**DEEPLAB_TINY, "aux_head": True}, num_classes=NUM_CLASSES, image_size=DEEPLAB_SIZE)
  model.build_for_training()
  images, labels = deeplab_batch()
  _poison(model.aux.classifier.bias, 2, -np.inf)
  _assert_terms_nan(model, images, labels)


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_toy_detector(value):
  images, labels = toy_batch(4)
  model = toy_model()
  _clean_terms_are_finite(model, images, labels)
  _poison(model.head.bias, 0, value)  # a box logit: sigmoid(inf) = 1 would hide it
  _assert_terms_nan(model, images, labels)
