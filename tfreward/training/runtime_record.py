"""`runtime.json` in a model directory: what decides a run's bits besides its config and seed.

Two runs of one config and seed are bit-identical on one machine with one TensorFlow build (tested in
tests/test_end_to_end.py). Across machines and builds the XLA step rounds differently (another CPU instruction set,
another XLA version, or no XLA at all when op determinism is on), and those differences of 1e-5 in the first
losses grow into about 0.01 mAP after training. Comparing two runs' `runtime.json` tells which of these differ.
"""

import json
import os
import platform

import keras
import numpy as np
import tensorflow as tf


def op_determinism_enabled():
  """Whether TensorFlow op determinism is on (TF_DETERMINISTIC_OPS=1 or enable_op_determinism())."""
  from tensorflow.python.framework import config as tf_config  # No public getter in TF 2.21.
  return bool(tf_config.is_op_determinism_enabled())


def _cpu_flags():
  try:
    with open("/proc/cpuinfo") as f:
      flags = next(line for line in f if line.startswith("flags")).split(":", 1)[1].split()
  except (OSError, StopIteration):
    return []
  return sorted(f for f in flags if f.startswith(("avx", "fma", "amx", "sse4")))


def write(model, model_dir):
  """runtime.json: what decides a run's bits besides config and seed (same values -> same losses and metrics)."""
  import tensorflow_datasets as tfds  # Lazy, like the trainer's other data imports.
  record = {"tensorflow": tf.__version__, "keras": keras.__version__, "tensorflow_datasets": tfds.__version__,
            "numpy": np.__version__, "train_step_xla": bool(model.jit_compile),
            "op_determinism": op_determinism_enabled(),
            "onednn_opts": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default"),
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "machine": platform.machine(), "cpu_flags": _cpu_flags()}
  with open(os.path.join(model_dir, "runtime.json"), "w") as f:
    json.dump(record, f, indent=2)
