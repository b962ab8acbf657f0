"""Experiment wiring: strategy, datasets, model, optimizer, callbacks and `model.fit`.

A model directory holds:
  config.yaml           the resolved config the run used
  backup/               BackupAndRestore state, so an interrupted run resumes at the epoch it stopped in
  checkpoints/          weights after every epoch (`latest.weights.h5`)
  logs/                 TensorBoard
  final.weights.h5      weights at the end of training
  metrics.json          the last evaluation
  export/               the SavedModel written by `tfreward export` (`tfreward.export.saved_model`)

Under a multi-worker strategy only the chief writes there; the other workers write to temporary directories that
are removed, and resume from the chief's backup (`tfreward.training.multi_worker`).

The trainer never imports `tfreward.export`: the CLI composes training and export.
"""

import dataclasses
import json
import logging
import os
import warnings

import keras
import tensorflow as tf
import yaml

from tfreward import strategy as strategies, registry
from tfreward.config import ConfigError, to_dict
from tfreward.errors import UserError
from tfreward.training import divergence
from tfreward.training import existing_run
from tfreward.training import multi_worker
from tfreward.training import recipes
from tfreward.training import runtime_record
from tfreward.training.optimizers import build_optimizer

FINAL_WEIGHTS = existing_run.FINAL_WEIGHTS
LATEST_WEIGHTS = os.path.join("checkpoints", "latest.weights.h5")


@dataclasses.dataclass
class TrainResult:
  model: keras.Model
  history: dict
  metrics: dict
  is_chief: bool = True  # False on the workers of a multi-worker run that write nothing
  already_complete: bool = False  # the model dir held this config's finished run: nothing was trained
  weights_sha256: str = ""  # fingerprint of the final weights: equal on every worker


def _data_kwargs(config, *, training):
  d = config.data
  sharding = dict(input_sharding=d.input_sharding) if training else {}
  return dict(**sharding, dataset=d.dataset, task=d.task, split=d.train_split if training else d.eval_split,
              training=training, image_size=tuple(d.image_size),
              global_batch_size=d.global_batch_size if training else d.eval_batch_size,
              max_instances=d.max_instances, data_dir=d.data_dir, manual_dir=d.manual_dir,
              shuffle_buffer=d.shuffle_buffer, hflip=d.augment.hflip,
              scale_range=(d.augment.scale_min, d.augment.scale_max),
              max_examples=None if training else d.max_eval_examples, seed=config.runtime.seed)


def check_global_batch(config, num_replicas):
  """ConfigError unless `data.global_batch_size` splits evenly over `num_replicas` replicas."""
  if config.data.global_batch_size % num_replicas:
    raise ConfigError(f"data.global_batch_size {config.data.global_batch_size} is not divisible by the "
                      f"{num_replicas} replicas.")


def dataset_spec(config):
  from tfreward.data import pipeline  # Lazy: keeps `import tfreward.training.trainer` light for tests.
  return pipeline.dataset_spec(config.data.dataset, data_dir=config.data.data_dir,
                               manual_dir=config.data.manual_dir)


def eval_dataset(config):
  """The host-side (not distributed) evaluation dataset; every example, last batch padded and masked."""
  from tfreward.data import pipeline
  return pipeline.build_dataset(**_data_kwargs(config, training=False))


def build_model(config, strategy=None, spec=None, *, compile_model=True):
  """Builds (and compiles) the configured model inside `strategy.scope()`, with every variable created."""
  strategy = strategy or tf.distribute.get_strategy()
  spec = spec or dataset_spec(config)
  family = registry.get_family(config.model.family)
  if family.task != config.data.task:
    raise ConfigError(f"model family {config.model.family!r} is a {family.task} model but data.task is "
                      f"{config.data.task!r}.")
  previous_policy = keras.mixed_precision.global_policy()
  keras.mixed_precision.set_global_policy("mixed_bfloat16" if config.train.mixed_precision else "float32")
  try:
    with strategy.scope():
      model = registry.build_model(config.model, num_classes=spec.num_classes_for(config.data.task),
                                   image_size=tuple(config.data.image_size),
                                   clip_norm=config.train.optimizer.clip_norm)
      if compile_model:
        total_steps = config.train.epochs * config.train.steps_per_epoch
        xla = strategies.use_xla_in_compile(strategy)
        model.compile(optimizer=build_optimizer(config.train.optimizer, total_steps), jit_compile=xla,
                      steps_per_execution=config.train.steps_per_execution if xla else 1)
        if xla and not model.jit_compile:
          # Keras drops jit_compile=True with only a warning when op determinism is on (TF_DETERMINISTIC_OPS=1 or
          # tf.config.experimental.enable_op_determinism()) or a layer has supports_jit=False. The graph step it
          # falls back to rounds differently (YOLOX-nano: loss 13.51640 vs 13.51634 at step 0), so the run does not
          # reproduce the committed numbers; the XLA step is already bit-reproducible on one machine and TF build.
          logging.warning("The train step runs without XLA (op determinism enabled: %s): results will differ from "
                          "XLA runs of the same config and seed.", runtime_record.op_determinism_enabled())
      model.build_for_training()
  finally:
    keras.mixed_precision.set_global_policy(previous_policy)
  return model


def eval_callback(config, **kwargs):
  """The evaluation callback for the configured task (COCO box mAP or mean IoU); `kwargs` go to its constructor."""
  from tfreward.training import eval_callback as callbacks
  dataset = eval_dataset(config)
  every = config.train.eval_every_epochs
  if config.data.task == "segmentation":
    spec = dataset_spec(config)
    return callbacks.SegmentationEvalCallback(dataset, num_classes=spec.num_classes_for("segmentation"),
                                              class_names=spec.segmentation_class_names, every_n_epochs=every,
                                              **kwargs)
  return callbacks.CocoEvalCallback(dataset, every_n_epochs=every, class_names=dataset_spec(config).class_names,
                                    **kwargs)


def _write_config(config, model_dir):
  os.makedirs(model_dir, exist_ok=True)
  with open(os.path.join(model_dir, "config.yaml"), "w") as f:
    yaml.safe_dump(to_dict(config), f, sort_keys=False)


def _flatten_model_section(raw):
  model = raw["model"]
  raw["model"] = {"family": model["family"], **model["options"]}
  return raw


def saved_config_dict(model_dir):
  """The config a run wrote, as a dict that `load_config` accepts."""
  path = os.path.join(model_dir, "config.yaml")
  if not os.path.exists(path):
    raise ConfigError(f"{model_dir!r} has no config.yaml: is it a tfreward model directory?")
  with open(path) as f:
    return _flatten_model_section(yaml.safe_load(f))


def _set_dataset_statistics(config, model):
  """Gives the model the training-split statistics it asks for (`required_dataset_statistics`), counted once."""
  needed = model.required_dataset_statistics()
  if not needed:
    return
  from tfreward.data import statistics
  known = {"class_pixel_counts": lambda: statistics.class_pixel_counts(
      config.data.dataset, split=config.data.train_split, data_dir=config.data.data_dir,
      manual_dir=config.data.manual_dir)}
  unknown = [name for name in needed if name not in known]
  if unknown:
    raise ValueError(f"{type(model).__name__} asks for unknown dataset statistics {unknown}; known: {sorted(known)}.")
  model.set_dataset_statistics({name: known[name]() for name in needed})


def train(config, model_dir, *, callbacks=(), evaluate=True, verbose="auto", strategy=None, overwrite=False):
  """Trains `config` into `model_dir` and returns a TrainResult.

  If `model_dir` holds a run of the same config, resumes it from its backup, or returns it (`already_complete`,
  its final weights and metrics) when it has finished; a run of another config there is a ConfigError
  (`tfreward.training.existing_run`). `overwrite` first clears any run there. `strategy` overrides
  `config.runtime.strategy` (e.g. a MirroredStrategy over chosen devices).
  """
  from tfreward.data import pipeline
  # The strategy first: multi_worker must be created before any other TensorFlow op.
  strategy = strategy or strategies.get_strategy(config.runtime.strategy, config.runtime.tpu_address,
                                                 config.runtime.communication)
  chief = strategies.is_chief(strategy)
  if overwrite and chief:
    existing_run.clear(model_dir)
  # Checked before anything is written; a worker told to overwrite may see the run the chief is clearing.
  run_state = existing_run.NEW if overwrite and not chief else existing_run.state(config, model_dir)
  if run_state == existing_run.COMPLETE:
    return _completed_run(config, model_dir, chief)
  # Before seeding: generating the data on first use draws from the global random state, and would otherwise change
  # the initial weights (a run on freshly generated data then differed from one on existing data).
  pipeline.prepare_dataset(config.data.dataset, config.data.data_dir, config.data.manual_dir)
  keras.utils.set_random_seed(config.runtime.seed)
  spec = dataset_spec(config)
  check_global_batch(config, strategy.num_replicas_in_sync)
  # A resumed run's input starts after the batches trained before, so it sees the batches an uninterrupted one would.
  start_epoch = multi_worker.restore_point(os.path.join(model_dir, "backup"), repair=chief)
  train_data = pipeline.distributed_dataset(strategy, **_data_kwargs(config, training=True),
                                            start_batch=start_epoch * config.train.steps_per_epoch)
  model = build_model(config, strategy, spec)
  if config.train.init_checkpoint:
    # A .weights.h5 holds the optimizer too (step counter, moments): keep only the model's weights, so the new
    # stage's schedule starts at step 0 with fresh moments.
    fresh = [v.numpy() for v in model.optimizer.variables]
    model.load_weights(config.train.init_checkpoint)
    for variable, value in zip(model.optimizer.variables, fresh):
      variable.assign(value)
    logging.info("Initialised weights from %s", config.train.init_checkpoint)
  _set_dataset_statistics(config, model)
  out_dir = multi_worker.write_dir(model_dir, strategy)
  try:
    return _fit(config, model, train_data, model_dir, out_dir, callbacks=callbacks,
                evaluate=evaluate and chief, chief=chief, verbose=verbose)
  finally:
    multi_worker.remove_write_dir(out_dir, model_dir)


def _completed_run(config, model_dir, chief):
  """The TrainResult of the finished run in `model_dir`: its final weights and last metrics, no history."""
  model = load_trained_model(config, model_dir)
  metrics_path = os.path.join(model_dir, "metrics.json")
  metrics = {}
  if os.path.exists(metrics_path):
    with open(metrics_path) as f:
      metrics = {k: float(v) for k, v in json.load(f).items() if "/" not in k}
  return TrainResult(model=model, history={}, metrics=metrics, is_chief=chief,
                     weights_sha256=multi_worker.weights_sha256(model), already_complete=True)


def _fit(config, model, train_data, model_dir, out_dir, *, callbacks, evaluate, chief, verbose):
  """`model.fit` with the standard callbacks writing into `out_dir`, restoring from `model_dir`'s backup."""
  _write_config(config, out_dir)
  runtime_record.write(model, out_dir)
  evaluator = eval_callback(config) if evaluate else None
  standard = [evaluator] if evaluator is not None else []
  log_dir = os.path.join(out_dir, "logs")
  standard += [
      multi_worker.WorkerBackupAndRestore(os.path.join(out_dir, "backup"),
                                          restore_dir=os.path.join(model_dir, "backup")),
      keras.callbacks.ModelCheckpoint(os.path.join(out_dir, LATEST_WEIGHTS), save_weights_only=True,
                                      save_freq="epoch"),
      keras.callbacks.TensorBoard(log_dir, write_graph=False),
      *callbacks,
  ]
  # The divergence guard goes first, so a non-finite step stops training before any callback sees its weights; then
  # the recipe's callbacks (e.g. EMA, reward statistics), so evaluation and checkpoints see their effect.
  all_callbacks = ([divergence.StopOnNonFinite(model_dir)] + recipes.recipe_callbacks(model, standard, log_dir=log_dir)
                   + standard)
  # Our datasets shuffle themselves; Keras warns about its own `shuffle` default for every tf.data input.
  warnings.filterwarnings("ignore", message="`shuffle=True` was passed")
  history = model.fit(train_data, epochs=config.train.epochs, steps_per_epoch=config.train.steps_per_epoch,
                      callbacks=all_callbacks, verbose=verbose)
  model.save_weights(os.path.join(out_dir, FINAL_WEIGHTS))
  metrics = {}
  if evaluate:
    metrics = {k: float(v) for k, v in evaluator.last_results.items()}
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
      json.dump(metrics, f, indent=2)
  return TrainResult(model=model, history=history.history, metrics=metrics, is_chief=chief,
                     weights_sha256=multi_worker.weights_sha256(model))


def load_trained_model(config, model_dir, *, weights=None):
  """Rebuilds the model of `config` (single replica) and loads its final (or latest) weights."""
  model = build_model(config, compile_model=False)
  if weights is None:
    for name in (FINAL_WEIGHTS, LATEST_WEIGHTS):
      if os.path.exists(os.path.join(model_dir, name)):
        weights = os.path.join(model_dir, name)
        break
    else:
      raise FileNotFoundError(f"{model_dir!r} holds no trained weights ({FINAL_WEIGHTS} or {LATEST_WEIGHTS}); "
                              "run `tfreward train` first.")
  try:
    model.load_weights(weights)
  except OSError as e:
    raise UserError(f"{weights} is unreadable ({str(e).splitlines()[0]}): the file was cut short or is not a "
                    "weights file. Rerun `tfreward train` with the same config to resume from the backup, or "
                    "restore the file.") from e
  return model


def evaluate(config, model_dir, *, weights=None):
  """Evaluates the trained model in `model_dir` on the evaluation split; writes and returns the metrics dict."""
  model = load_trained_model(config, model_dir, weights=weights)
  results = evaluate_model(config, model, per_class=True)
  with open(os.path.join(model_dir, "metrics.json"), "w") as f:
    json.dump(results, f, indent=2)
  return results


def evaluate_model(config, model, *, per_class=False, **kwargs):
  """Metrics of `model` (anything with the task's `detect` or `segment` and `image_size`, e.g. a served
  SavedModel) on `config`'s evaluation split: dict name -> float. With `per_class`, also "AP/<class name>" (COCO AP
  0.5:0.95) or "IoU/<class name>" (NaN for a class absent from both the labels and the predictions). `kwargs` go to
  the evaluation callback."""
  callback = eval_callback(config, **kwargs)
  results = {k: float(v) for k, v in callback.evaluate(model).items()}
  if per_class:
    if config.data.task == "segmentation":
      results.update({f"IoU/{name}": float(v) for name, v in callback.per_class_iou().items()})
    else:
      results.update({f"AP/{name}": float(v) for name, v in callback.per_class_ap().items()})
  return results
