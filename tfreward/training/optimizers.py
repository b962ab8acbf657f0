"""Optimizer and learning-rate schedule from `OptimizerConfig`: AdamW or SGD, linear warmup, then cosine, step
or constant. Normalisation scales and biases are excluded from weight decay."""

import math

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="tfreward")
class WarmupSchedule(keras.optimizers.schedules.LearningRateSchedule):
  """Linear warmup from 0 to `peak` over `warmup_steps`, then one of:

  cosine:   peak -> peak * min_ratio over the remaining steps up to `total_steps`;
  step:     peak * decay_rate ** (number of `boundaries` passed);
  constant: peak.
  """

  def __init__(self, peak, total_steps, warmup_steps=0, kind="cosine", boundaries=None, decay_rate=0.1,
               min_ratio=0.0):
    if kind not in ("cosine", "step", "constant"):
      raise ValueError(f"kind must be 'cosine', 'step' or 'constant', got {kind!r}.")
    if warmup_steps < 0 or total_steps <= 0:
      raise ValueError(f"need warmup_steps >= 0 and total_steps > 0, got {warmup_steps}, {total_steps}.")
    self.peak = float(peak)
    self.total_steps = int(total_steps)
    self.warmup_steps = int(warmup_steps)
    self.kind = kind
    if boundaries is None:
      boundaries = [int(total_steps * 2 / 3), int(total_steps * 8 / 9)]
    self.boundaries = [int(b) for b in boundaries]
    self.decay_rate = float(decay_rate)
    self.min_ratio = float(min_ratio)

  def __call__(self, step):
    step = tf.cast(step, tf.float32)
    warmup = tf.cast(self.warmup_steps, tf.float32)
    if self.kind == "cosine":
      span = max(self.total_steps - self.warmup_steps, 1)
      progress = tf.clip_by_value((step - warmup) / span, 0.0, 1.0)
      cosine = 0.5 * (1.0 + tf.cos(math.pi * progress))
      value = self.peak * (self.min_ratio + (1.0 - self.min_ratio) * cosine)
    elif self.kind == "step":
      passed = tf.add_n([tf.cast(step >= b, tf.float32) for b in self.boundaries]) if self.boundaries else 0.0
      value = self.peak * tf.pow(self.decay_rate, passed)
    else:
      value = tf.constant(self.peak)
    if self.warmup_steps > 0:
      value = tf.where(step < warmup, self.peak * (step + 1.0) / warmup, value)
    return value

  def get_config(self):
    return {"peak": self.peak, "total_steps": self.total_steps, "warmup_steps": self.warmup_steps,
            "kind": self.kind, "boundaries": self.boundaries, "decay_rate": self.decay_rate,
            "min_ratio": self.min_ratio}


def build_schedule(opt_config, total_steps):
  return WarmupSchedule(opt_config.learning_rate, total_steps, warmup_steps=opt_config.warmup_steps,
                        kind=opt_config.schedule, boundaries=opt_config.decay_steps,
                        decay_rate=opt_config.decay_rate, min_ratio=opt_config.min_learning_rate_ratio)


NO_DECAY_NAMES = ("bias", "gamma", "beta", "scale", "moving_mean", "moving_variance")


def build_optimizer(opt_config, total_steps):
  """Returns a Keras optimizer for `OptimizerConfig`. Gradient clipping is done by the model (global batch)."""
  schedule = build_schedule(opt_config, total_steps)
  if opt_config.name == "adamw":
    optimizer = keras.optimizers.AdamW(learning_rate=schedule, weight_decay=opt_config.weight_decay,
                                       beta_1=opt_config.beta_1, beta_2=opt_config.beta_2,
                                       epsilon=opt_config.epsilon)
  elif opt_config.name == "sgd":
    optimizer = keras.optimizers.SGD(learning_rate=schedule, momentum=opt_config.momentum,
                                     nesterov=opt_config.nesterov, weight_decay=opt_config.weight_decay or None)
  else:
    raise ValueError(f"optimizer name must be 'adamw' or 'sgd', got {opt_config.name!r}.")
  if opt_config.weight_decay:
    optimizer.exclude_from_weight_decay(var_names=list(NO_DECAY_NAMES))
  return optimizer
