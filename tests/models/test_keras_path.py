"""The plain Keras path, for every family: built in a strategy scope, `compile(optimizer=...)`, `fit` with
`validation_data` and a user's own callback, `evaluate`, `predict`, `save("m.keras")` and `keras.models.load_model`,
on the datasets of `tfreward.data.pipeline.build_dataset` (tiny models, two steps)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfreward import registry
from tfreward.data import pipeline

DATASET, SIZE = "tfreward_shapes/test", (64, 64)
TINY = {
    "toy_detector": dict(num_slots=8, width=8),
    "yolox": dict(depth_multiplier=0.33, width_multiplier=0.125),
    "retinanet": dict(backbone_width=8, fpn_channels=16, head_convs=1, head_channels=16),
    "group_detr": dict(backbone="small_cnn", backbone_width=8, backbone_stages=3, hidden_dim=16, num_heads=2,
                       encoder_layers=1, decoder_layers=2, ffn_dim=32, dropout=0.0, num_queries=6, num_groups=3),
    "pix2seq": dict(max_level=16, num_boxes=3, encoder_width=8, encoder_stages=2, encoder_layers=1, dim=16,
                    decoder_layers=1, num_heads=2, mlp_ratio=2),
    "deeplab": dict(backbone="resnet10", backbone_width=8, aspp_channels=16),
}


@pytest.fixture(scope="module")
def data_dir(shapes_test_data_dir):
  return shapes_test_data_dir


class _Seen(keras.callbacks.Callback):
  """A user's callback: records the logs Keras hands it."""

  def __init__(self):
    super().__init__()
    self.epoch_logs = []

  def on_epoch_end(self, epoch, logs=None):
    self.epoch_logs.append(dict(logs or {}))


@pytest.mark.slow  # about a minute per family: XLA compilation of the train, test and predict steps
@pytest.mark.parametrize("name", list(TINY))
def test_compile_fit_evaluate_predict_save_load(name, data_dir, tmp_path):
  family = registry.get_family(name)
  task = family.task
  spec = pipeline.dataset_spec(DATASET)
  data = dict(dataset=DATASET, task=task, image_size=SIZE, global_batch_size=4, max_instances=3, data_dir=data_dir)
  train = pipeline.build_dataset(split="train", training=True, seed=0, **data)
  validation = pipeline.build_dataset(split="validation", training=False, **data)
  with tf.distribute.get_strategy().scope():
    model = family.model_cls(TINY[name], num_classes=spec.num_classes_for(task), image_size=SIZE)
  model.compile(optimizer=keras.optimizers.Adam(1e-3))
  seen = _Seen()
  history = model.fit(train, steps_per_epoch=2, epochs=1, validation_data=validation, validation_steps=1,
                      callbacks=[seen], verbose=0)
  assert np.isfinite(history.history["loss"][0]) and "val_loss" in history.history
  assert seen.epoch_logs[0]["loss"] == history.history["loss"][0]
  scores = model.evaluate(validation, steps=1, return_dict=True, verbose=0)
  assert np.isfinite(scores["loss"])
  predictions = model.predict(validation, steps=1, verbose=0)
  if task == "detection":
    assert predictions["boxes"].shape[:2] == predictions["scores"].shape and predictions["boxes"].shape[0] == 4
  else:
    assert predictions["labels"].shape == (4, *SIZE)
  path = str(tmp_path / "model.keras")
  model.save(path)
  loaded = keras.models.load_model(path)
  assert type(loaded) is type(model) and loaded.options == model.options
  for a, b in zip(model.get_weights(), loaded.get_weights()):
    np.testing.assert_array_equal(a, b)
  again = loaded.predict(validation, steps=1, verbose=0)
  for key in predictions:
    np.testing.assert_allclose(again[key], predictions[key], rtol=1e-5, atol=1e-5, err_msg=key)
