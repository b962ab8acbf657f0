"""Where one Pix2Seq reward-tuning step spends its time: sampling, reward, teacher-forced pass, backward.

  python bench/pix2seq_reward_step.py                       # configs/shapes/pix2seq_reward.yaml, 16 images x 4 samples
  python bench/pix2seq_reward_step.py --config CONFIG --repeats 20

The model of the config (random weights: every shape is static, so the time does not depend on what is sampled) on
one batch of `data.global_batch_size` images with `data.max_instances` random objects. Each part is compiled on its
own with XLA, like the trainer's step, and timed as the median of `--repeats` calls after a warm-up:

  sampling      encoder forward + N sequences per image decoded token by token (`decode`, a while loop)
  reward        `detection_reward` of the samples, plus the per-slot credit when `credit: slot`
  forward       the loss terms from given samples (encoder, reward, teacher-forced decoder on B x N sequences, MLE
                anchor) minus `reward` and the encoder
  backward      loss and gradient from given samples, minus the forward
  whole step    `train_step` as the trainer compiles it (sampling, loss, gradient, clipping, optimizer update)

The parts overlap (the encoder runs in several), so they do not sum exactly to the whole step.
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tfreward.config import load_config  # noqa: E402
from tfreward.models.pix2seq import reward  # noqa: E402
from tfreward.rewards import detection  # noqa: E402
from tfreward.training import trainer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_batch(batch, size, max_instances, num_classes, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (batch, *size, 3)).astype(np.uint8)
  lo = rng.uniform(0, 0.7, (batch, max_instances, 2))
  hi = lo + rng.uniform(0.1, 0.3, (batch, max_instances, 2))
  valid = rng.random((batch, max_instances)) < 0.7
  labels = {"boxes": tf.constant(np.concatenate([lo, hi], -1), tf.float32),
            "classes": tf.constant(np.where(valid, rng.integers(0, num_classes, valid.shape), -1), tf.int32),
            "valid": tf.constant(valid)}
  return tf.constant(images), labels


def median_ms(fn, repeats):
  tf.nest.map_structure(lambda t: t.numpy(), fn())  # warm-up: compilation
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    tf.nest.map_structure(lambda t: t.numpy(), fn())
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default=os.path.join(ROOT, "configs", "shapes", "pix2seq_reward.yaml"))
  parser.add_argument("--repeats", type=int, default=10)
  args = parser.parse_args()
  config = load_config(args.config)
  model = trainer.build_model(config)
  o = model.options
  if o.mode != "reward":
    raise SystemExit(f"{args.config} is not a reward config (model.mode={o.mode!r}).")
  images, labels = make_batch(config.data.global_batch_size, tuple(config.data.image_size),
                              config.data.max_instances, model.num_classes)
  seed = tf.constant([0, 2], tf.int64)
  jit = lambda fn: tf.function(fn, jit_compile=True)  # noqa: E731

  encode = jit(lambda: model.encoder(images, training=True))
  sample = jit(lambda: model.sample(model.encoder(images, training=True), o.samples, num_samples=o.num_samples,
                                    seed=seed)["tokens"])
  samples = sample()
  gt = reward.gt_sequence(labels, model.layout)

  def reward_only():
    rewards, _ = detection.detection_reward(samples, gt, **model.reward_config)
    return reward.slot_credit(samples, gt, rewards, model.reward_config) if o.credit == "slot" else rewards

  def loss():
    terms = model.compute_losses(images, labels, training=True, samples=samples)
    return model.total_loss(terms)

  def loss_and_grad():
    with tf.GradientTape() as tape:
      total = loss()
    grads = tape.gradient(total, model.trainable_variables)
    return total, [tf.convert_to_tensor(g) for g in grads if g is not None]

  step = jit(lambda: model.train_step((images, labels)))
  t = {name: median_ms(fn, args.repeats) for name, fn in
       (("encoder", encode), ("sampling", sample), ("reward", jit(reward_only)), ("loss", jit(loss)),
        ("loss+grad", jit(loss_and_grad)), ("step", step))}
  parts = {
      "sampling (encoder + decoding)": t["sampling"],
      "reward": t["reward"],
      "teacher-forced forward": t["loss"] - t["reward"] - t["encoder"],
      "backward": t["loss+grad"] - t["loss"],
      "whole train step": t["step"],
  }
  print(f"{args.config}: {config.data.global_batch_size} images x {o.num_samples} samples x {model.seq_len} tokens, "
        f"credit {o.credit}, reinforce_samples {o.reinforce_samples}; {os.cpu_count()} CPU cores, load average "
        f"{os.getloadavg()[0]:.1f}; medians of {args.repeats} calls")
  for name, ms in parts.items():
    print(f"  {name:32}{ms:8.1f} ms")
  print(f"  (encoder forward alone {t['encoder']:.1f} ms)")


if __name__ == "__main__":
  main()
