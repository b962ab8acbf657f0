"""The Keras model base every family extends: one train/test/predict step for all of them.

A family is a `TaskModel` subclass with an options dataclass (`options_cls`), built as
`Family(options, *, num_classes, image_size)`. The options are the single spelling of the family's keys, defaults
and checks: the YAML `model:` section validates into them, the constructor takes them, `get_config` is derived from
them. A family implements

  `compute_losses(images, labels, training) -> dict`  loss terms and logging values (contract below);
  `detect(images) -> dict` (detection) or `segment(images) -> dict` (segmentation): fixed-size outputs;
  `loss_weights` (property): loss term -> weight. The total is their weighted sum, formed here and nowhere else;
  `log_names`: the keys of `compute_losses` shown in the progress bar (a tuple, or a property of the options);
and optionally
  `statistic_names`: further keys of `compute_losses` tracked as running epoch means (reward statistics), read by
      `reward_statistics()` together with a logged `reward`;
  `recipe_callbacks() -> list[RecipeCallback]`: callbacks its training recipe needs (weight EMA, reward statistics),
      by name; the trainer builds them (`tfreward.training.recipes`), so models never import `training`;
  `learning_rate_multipliers() -> list[(variables, float)]`: per-layer learning rates (e.g. a backbone at 0.1 x lr).

XLA: under the default strategy the trainer compiles the whole step with `jit_compile=True`, and TPUStrategy
always compiles it. Under MirroredStrategy the step runs as a TensorFlow graph without XLA: Keras 3.15 cannot
jit-compile the mirrored train function (keras-team/keras#19246), and a nested `tf.function(jit_compile=True)`
cannot hold the cross-replica all-reduce that loss normalisers need (MirroredStrategy's all-reduce is a
`merge_call`, which nested functions do not support). The step is the same static-shape graph either way.

Gradient clipping by global norm is applied to the gradient of the global batch (summed over replicas), not to
each replica's part.
"""

import dataclasses
from typing import NamedTuple

import keras
import tensorflow as tf

from tfreward.config import from_dict
from tfreward.errors import check_int
from tfreward.models.divergence import DivergenceMonitor
from tfreward.ops import distributed


class RecipeCallback(NamedTuple):
  """A callback a family's recipe needs, by name (`tfreward.training.recipes.RECIPE_CALLBACKS`) and arguments."""
  name: str
  kwargs: dict


def _scale_updates(variables, before, multiplier):
  """Moves each variable to `before + multiplier * (now - before)`, in cross-replica context like an optimizer."""
  def update(distribution, variables, before):
    for var, old in zip(variables, before):
      distribution.extended.update(var, lambda v, o: v.assign(o + multiplier * (v - o)), args=(old,), group=False)
  tf.__internal__.distribute.interim.maybe_merge_call(update, tf.distribute.get_strategy(), variables, before)


class TaskModel(keras.Model):
  """Base class: options, shared train_step / test_step / predict_step, config.

  Args:
    options: the family's `options_cls` instance, a dict of its fields (validated like a YAML `model:` section), or
      None for its defaults.
    num_classes: int. Object (or segmentation) classes.
    image_size: (int, int). Input canvas height and width.
    clip_norm: float or None. Global-norm gradient clipping over the global batch. Defaults to None.
  """

  options_cls = None
  log_names = ()
  statistic_names = ()

  def __init_subclass__(cls, **kwargs):
    super().__init_subclass__(**kwargs)
    # Every family is Keras-serializable under its own module's name, so `model.save("m.keras")` and
    # `keras.models.load_model("m.keras")` work once the family's module is imported (tfreward.models.<family>).
    keras.saving.register_keras_serializable(package=cls.__module__)(cls)

  def __init__(self, options=None, *, num_classes, image_size, clip_norm=None, **kwargs):
    super().__init__(**kwargs)
    self.options = self.parse_options(options)
    check_int("num_classes", num_classes)
    self.num_classes = num_classes
    self.image_size = tuple(int(s) for s in image_size)
    if len(self.image_size) != 2 or min(self.image_size) <= 0:
      raise ValueError(f"image_size must be two positive ints (height, width), got {image_size!r}.")
    self.clip_norm = None if clip_norm is None else float(clip_norm)
    names = ("loss",) + tuple(n for n in self.log_names if n != "loss")
    self._trackers = {n: keras.metrics.Mean(name=n) for n in names}
    self.stat_trackers = {n: keras.metrics.Mean(name=n) for n in self.statistic_names}
    self.divergence_monitor = DivergenceMonitor(names)

  @classmethod
  def parse_options(cls, options):
    """None, a dict of fields or an `options_cls` instance -> a validated `options_cls` instance."""
    if options is None:
      return cls.options_cls()
    if isinstance(options, dict):
      return from_dict(cls.options_cls, options, "model")
    if not isinstance(options, cls.options_cls):
      raise ValueError(f"options must be a {cls.options_cls.__name__} or a dict of its fields, got {options!r}.")
    return options

  # === To implement ===

  @property
  def loss_weights(self):
    """dict loss term -> float weight; the total loss is the weighted sum of these terms."""
    raise NotImplementedError

  def compute_losses(self, images, labels, training):
    """Loss terms of one replica's batch.

    Args:
      images: [B, H, W, 3] uint8 or float32, pixels 0..255 (the model normalises them).
      labels: detection: dict of `boxes` [B, M, 4] float32 normalised yxyx of the canvas (0 for padding),
        `classes` [B, M] int32 (0-based, -1 for padding), `valid` [B, M] bool; segmentation: `mask` [B, H, W] int32
        (255 = ignore). Other keys of the data contract (image_id, ...) may be present and are ignored.
      training: bool. True in the train step (dropout, batch statistics, training-only branches).

    Returns:
      dict name -> scalar float tensor: every key of `loss_weights` and of `log_names`. Each value is this replica's
      *share* of the global-batch value (its sum divided by a normaliser summed over all replicas, see
      `tfreward.ops.distributed`), so the shares add up to the global-batch value and N replicas compute what one
      replica computes on the same global batch.
    """
    raise NotImplementedError

  def recipe_callbacks(self):
    """The callbacks this family's training recipe needs, as `RecipeCallback`s. Defaults to none."""
    return []

  def required_dataset_statistics(self):
    """Names of training-split statistics the trainer must pass to `set_dataset_statistics` before training (e.g.
    "class_pixel_counts": labelled pixels per class). Defaults to none."""
    return ()

  def set_dataset_statistics(self, statistics):
    """Receives {name: value} for the names of `required_dataset_statistics`. Defaults to ignoring them."""
    del statistics

  def learning_rate_multipliers(self):
    """Per-layer learning rates: a list of (variables, multiplier). Defaults to none (every variable at lr).

    The optimizer step is applied, then each listed variable is moved back to old + multiplier * (new - old).
    AdamW's and SGD's updates, decoupled weight decay included, are linear in the learning rate, so this is exactly
    a learning rate of multiplier x lr for those variables (scaling gradients would not be: Adam ignores their scale).
    """
    return []

  # === Steps ===

  @property
  def metrics(self):
    return list(self._trackers.values()) + list(self.stat_trackers.values())

  def reward_statistics(self):
    """Running epoch means of `statistic_names` and of a logged `reward`: dict name -> float ({} without any)."""
    if not self.stat_trackers:
      return {}
    stats = {"reward": float(self._trackers["reward"].result())} if "reward" in self._trackers else {}
    stats.update({name: float(t.result()) for name, t in self.stat_trackers.items()})
    return stats

  def total_loss(self, terms):
    total = tf.add_n([tf.cast(terms[k], tf.float32) * w for k, w in self.loss_weights.items()])
    if self.losses:  # weight regularisers: a global quantity, split evenly over the replicas.
      total += tf.add_n([tf.cast(l, tf.float32) for l in self.losses]) / float(distributed.num_replicas())
    return total

  def compute_gradients(self, images, labels):
    """This replica's share of the loss gradient. Returns (grads, total loss share, terms)."""
    with tf.GradientTape() as tape:
      terms = self.compute_losses(images, labels, training=True)
      total = self.total_loss(terms)
    grads = tape.gradient(total, self.trainable_variables)
    return grads, total, terms

  def clip_gradients(self, grads):
    """Clips the global-batch gradient to `clip_norm`; returns this replica's share of the clipped gradient."""
    if not self.clip_norm:
      return grads
    replicas = distributed.num_replicas()
    present = [g for g in grads if g is not None]
    summed = [distributed.global_sum(g) for g in present] if replicas > 1 else present
    clipped, _ = tf.clip_by_global_norm(summed, self.clip_norm)
    clipped = iter([g / float(replicas) for g in clipped] if replicas > 1 else clipped)
    return [None if g is None else next(clipped) for g in grads]

  def apply_gradients(self, grads):
    """The optimizer step, with the `learning_rate_multipliers` applied to the update of their variables."""
    scaled = [(list(v), float(m)) for v, m in self.learning_rate_multipliers() if m != 1.0 and list(v)]
    before = [[tf.identity(var.value) for var in variables] for variables, _ in scaled]
    self.optimizer.apply(grads, self.trainable_variables)
    for (variables, multiplier), old in zip(scaled, before):
      _scale_updates([var.value for var in variables], old, multiplier)

  def _log(self, total, terms):
    self._trackers["loss"].update_state(distributed.global_sum(total))
    for name in self.log_names:
      if name != "loss":
        self._trackers[name].update_state(distributed.global_sum(tf.cast(terms[name], tf.float32)))
    for name, tracker in self.stat_trackers.items():
      tracker.update_state(distributed.global_sum(tf.cast(terms[name], tf.float32)))
    logs = {name: tracker.result() for name, tracker in self._trackers.items()}
    if distributed.is_multi_worker(tf.distribute.get_strategy()):
      # Keras 3.15 reduces a multi-worker step's outputs with MEAN along axis 0, which fails on scalars; the values
      # are already the same on every replica, so a [1] vector averages to the same value.
      logs = {name: tf.reshape(value, [1]) for name, value in logs.items()}
    return logs

  def train_step(self, data):
    images, labels, _ = keras.utils.unpack_x_y_sample_weight(data)
    grads, total, terms = self.compute_gradients(images, labels)
    monitored = [total] + [terms[name] for name in self._trackers if name != "loss"]
    self.divergence_monitor.update_state(self.optimizer.iterations, monitored, grads)
    self.apply_gradients(self.clip_gradients(grads))
    return self._log(total, terms)

  def test_step(self, data):
    images, labels, _ = keras.utils.unpack_x_y_sample_weight(data)
    terms = self.compute_losses(images, labels, training=False)
    return self._log(self.total_loss(terms), terms)

  def predict_step(self, data):
    images, _, _ = keras.utils.unpack_x_y_sample_weight(data)
    if hasattr(self, "segment"):
      return self.segment(images)
    return self.detect(images)

  def build_for_training(self, optimizer=None):
    """Creates every variable (model and optimizer) from a dummy batch, inside the strategy scope.

    Keras' own symbolic build under a strategy averages the first input batch across replicas, which fails on the
    data contract's bool and int labels; a model built here skips it (see `_maybe_symbolic_build`).
    """
    if not self.built:
      self(tf.zeros([1, *self.image_size, 3], tf.uint8), training=False)
    optimizer = optimizer or getattr(self, "optimizer", None)
    if optimizer is not None and not optimizer.built:
      optimizer.build(self.trainable_variables)

  def get_build_config(self):
    """Always recorded: Keras records a build config only for a model marked built, which a model first called
    inside `fit`'s traced step is not, and without one loading never builds the model."""
    return {"input_shape": [None, *self.image_size, 3]}

  def build_from_config(self, config):
    """Builds a model loaded by `keras.models.load_model` by calling it, like `build_for_training`: Keras' symbolic
    build from the recorded input shape leaves some layers unbuilt (Pix2Seq's encoder), and their weights then fail
    to load. Called even when Keras already marks the model built."""
    del config
    self(tf.zeros([1, *self.image_size, 3], tf.uint8), training=False)

  def _maybe_symbolic_build(self, iterator=None, data_batch=None):
    # A private Keras method (keras/src/backend/tensorflow/trainer.py), overridden because no public hook exists:
    # under a strategy, Keras 3.10-3.15 peeks at the first batch and reduces it with MEAN across replicas before a
    # symbolic build, which fails on bool and int labels. A model whose variables `build_for_training` created needs
    # no symbolic build, so it is skipped. tests/models/test_base.py pins the Keras versions where this holds.
    optimizer = getattr(self, "optimizer", None)
    if self.built and (optimizer is None or optimizer.built):
      return
    super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

  # === Config ===

  def get_config(self):
    return {"options": dataclasses.asdict(self.options), "num_classes": self.num_classes,
            "image_size": list(self.image_size), "clip_norm": self.clip_norm, "name": self.name}
