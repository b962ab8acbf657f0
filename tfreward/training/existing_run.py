"""What a model directory already holds, checked before a run writes anything into it.

A directory with a `config.yaml` holds a run. Training the same config there resumes it (from `backup/`) or, when
it has finished (`final.weights.h5` and no backup), does nothing; training a different config there is an error
naming the first differing keys, unless `overwrite` clears the run's files first. Keys that only say where the data
is and what hardware runs (`RELOCATABLE_KEYS`) may differ: a run moved to another machine resumes.
"""

import os
import shutil

import yaml

from tfreward.config import ConfigError, to_dict

CONFIG = "config.yaml"
FINAL_WEIGHTS = "final.weights.h5"
# Everything a run writes (tfreward.training.trainer, tfreward export / predict defaults): what --overwrite clears.
RUN_FILES = (CONFIG, "runtime.json", FINAL_WEIGHTS, "metrics.json", "checkpoints", "backup", "logs", "export")
RELOCATABLE_KEYS = ("data.data_dir", "data.manual_dir", "runtime.strategy", "runtime.tpu_address",
                    "runtime.communication")
NEW, RESUME, COMPLETE = "new", "resume", "complete"


def _flatten(tree, prefix=""):
  """Nested dict -> {"a.b.c": leaf}; the model section's options read as `model.<key>` like in YAML."""
  flat = {}
  for key, value in tree.items():
    path = prefix + key
    if path == "model.options":
      path = "model"
    if isinstance(value, dict) and value:
      flat.update(_flatten(value, path + "."))
    else:
      flat[path] = value
  return flat


def differing_keys(config, saved):
  """Keys (dotted) whose values differ between `config` (ExperimentConfig) and `saved` (a config.yaml's dict), in
  config order, relocatable keys excepted: list of (key, saved value, new value)."""
  new = _flatten(yaml.safe_load(yaml.safe_dump(to_dict(config), sort_keys=False)))
  old = _flatten(saved)
  keys = list(new) + [k for k in old if k not in new]
  return [(k, old.get(k), new.get(k)) for k in keys if k not in RELOCATABLE_KEYS and old.get(k) != new.get(k)]


def state(config, model_dir):
  """NEW (no run there), RESUME (the same config, unfinished) or COMPLETE (the same config, finished).

  Raises ConfigError if `model_dir` holds a run of another config."""
  path = os.path.join(model_dir, CONFIG)
  if not os.path.exists(path):
    return NEW
  with open(path) as f:
    saved = yaml.safe_load(f)
  differences = differing_keys(config, saved)
  if differences:
    shown = "; ".join(f"{k}: {old!r} there, {new!r} here" for k, old, new in differences[:3])
    more = f" (and {len(differences) - 3} more)" if len(differences) > 3 else ""
    raise ConfigError(f"{model_dir!r} holds a run of another config ({shown}{more}): train into a new directory "
                      "(--model-dir NEW), or pass --overwrite to clear that run's checkpoints, backup and logs first.")
  finished = os.path.exists(os.path.join(model_dir, FINAL_WEIGHTS)) and not os.path.exists(
      os.path.join(model_dir, "backup"))
  return COMPLETE if finished else RESUME


def clear(model_dir):
  """Removes every file a run writes (`RUN_FILES`) from `model_dir`; other files stay."""
  for name in RUN_FILES:
    path = os.path.join(model_dir, name)
    if os.path.isdir(path):
      shutil.rmtree(path)
    elif os.path.exists(path):
      os.remove(path)
