"""Command line: `tfreward train|evaluate|export|data ...`.

  tfreward train CONFIG.yaml [--set key=value ...] [--model-dir DIR] [--workers HOST:PORT,... --worker-index I]
                [--dry-run]
  tfreward evaluate --model-dir DIR [--set key=value ...] [--saved-model [EXPORT_DIR]]
  tfreward export --model-dir DIR [--export-dir DIR]
  tfreward predict --saved-model DIR IMAGE_OR_GLOB... --out OUT_DIR [--score-threshold 0.3]
  tfreward curves MODEL_DIR... [--label NAME ...] [--metric NAME ...] [--out PNG]
  tfreward compare MODEL_DIR... [--label NAME ...] [--num-images N] [--out PNG] [--table | --min-score S]
  tfreward data preview [--dataset NAME] [--split SPLIT] [--out PNG] [--data-dir DIR]
  tfreward data build [--dataset NAME] [--data-dir DIR]

Errors a user can fix (a bad config key, a missing dataset) print one line and exit with status 2.
"""

import argparse
import copy
import json
import logging
import os
import sys


def _parser():
  parser = argparse.ArgumentParser(prog="tfreward", description=__doc__.split("\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)

  train = sub.add_parser("train", help="train a model from a YAML config")
  train.add_argument("config", help="path to an experiment YAML (see configs/)")
  train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config value, e.g. --set train.epochs=3 (repeatable)")
  train.add_argument("--model-dir", default=None, help="where checkpoints, logs and exports go "
                     "(default: runs/<config name>)")
  train.add_argument("--no-eval", action="store_true", help="skip evaluation during training")
  train.add_argument("--export", action="store_true", help="export a SavedModel after training")
  train.add_argument("--overwrite", action="store_true",
                     help="clear the run already in --model-dir (config, checkpoints, backup, logs, weights, "
                          "metrics, export) and train from scratch")
  train.add_argument("--workers", default=None, metavar="HOST:PORT,HOST:PORT",
                     help="train on several worker processes (runtime.strategy multi_worker): every worker's "
                     "address, the same list on each; or set TF_CONFIG")
  train.add_argument("--worker-index", type=int, default=None, metavar="I",
                     help="this process's index in --workers (0 is the chief, which writes the model directory)")
  train.add_argument("--dry-run", action="store_true",
                     help="print the strategy, replicas, batch sizes and input pipelines, then exit")

  evaluate = sub.add_parser("evaluate", help="evaluate a trained model on the evaluation split")
  evaluate.add_argument("--model-dir", required=True)
  evaluate.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
  evaluate.add_argument("--saved-model", nargs="?", const="", default=None, metavar="EXPORT_DIR",
                        help="evaluate the exported SavedModel as served (default: <model-dir>/export) instead of "
                        "the trained weights")

  export = sub.add_parser("export", help="export a trained model as a SavedModel for serving")
  export.add_argument("--model-dir", required=True)
  export.add_argument("--export-dir", default=None, help="default: <model-dir>/export")
  for sub_parser in (train, export):
    sub_parser.add_argument("--max-decoded-side", type=int, default=8192, metavar="PIXELS",
                            help="the export's encoded-image signature refuses (valid_image False) images whose "
                                 "header says they are larger than this on a side, before decoding (default 8192)")

  predict = sub.add_parser("predict", help="run an exported SavedModel on image files: PNGs with its predictions "
                           "drawn, and detections.json (COCO results format)")
  predict.add_argument("images", nargs="+", metavar="IMAGE_OR_GLOB", help="image files or globs (quote the glob)")
  predict.add_argument("--saved-model", required=True, metavar="EXPORT_DIR")
  predict.add_argument("--out", required=True, metavar="OUT_DIR")
  predict.add_argument("--score-threshold", type=float, default=0.3, help="draw and list detections scoring at "
                       "least this (default 0.3)")

  curves = sub.add_parser("curves", help="validation curves of runs side by side: a Markdown table and a PNG")
  curves.add_argument("model_dirs", nargs="+", metavar="MODEL_DIR")
  curves.add_argument("--label", dest="labels", action="append", default=None, help="one per run (repeatable); runs sharing a label are averaged, with their range")
  curves.add_argument("--metric", dest="metrics", action="append", default=None,
                      help="validation metric to show (repeatable; default: mAP and mAP50)")
  curves.add_argument("--out", default=None, help="PNG path for the plot")

  compare = sub.add_parser("compare", help="runs' predictions side by side on the same validation images (PNG)")
  compare.add_argument("model_dirs", nargs="+", metavar="MODEL_DIR")
  compare.add_argument("--label", dest="labels", action="append", default=None, help="one per run (repeatable)")
  compare.add_argument("--num-images", type=int, default=8)
  compare.add_argument("--out", default="compare.png")
  compare.add_argument("--table", action="store_true",
                       help="also score every run over the validation split: per-class IoU, boundary vs interior")
  compare.add_argument("--min-score", type=float, default=0.3,
                       help="detection runs: draw the detections scoring at least this (default 0.3)")

  data = sub.add_parser("data", help="build or look at a dataset")
  data_sub = data.add_subparsers(dest="data_command", required=True)
  preview = data_sub.add_parser("preview", help="write a PNG grid of images with boxes and masks")
  preview.add_argument("--dataset", default="tfreward_shapes")
  preview.add_argument("--split", default="train")
  preview.add_argument("--out", default="preview.png")
  preview.add_argument("--data-dir", default=None)
  preview.add_argument("--num-images", type=int, default=16)
  build = data_sub.add_parser("build", help="build the built-in synthetic dataset")
  build.add_argument("--dataset", default="tfreward_shapes")
  build.add_argument("--data-dir", default=None)
  return parser


def _export(config, model_dir, export_dir=None, max_decoded_side=8192):
  """Exports the trained model in `model_dir` as a SavedModel (default `<model_dir>/export`); returns its path."""
  from tfreward.export.saved_model import export_saved_model
  from tfreward.training import trainer
  from tfreward.data import decoders
  export_dir = export_dir or os.path.join(model_dir, "export")
  spec = trainer.dataset_spec(config)
  if config.data.task == "segmentation":
    names, ids = spec.segmentation_class_names, None
  else:
    names, ids = spec.class_names, decoders.COCO_CATEGORY_IDS if spec.name.startswith("coco") else None
  export_saved_model(trainer.load_trained_model(config, model_dir), export_dir, class_names=names, category_ids=ids,
                     max_decoded_side=max_decoded_side)
  return export_dir


def _evaluate_saved_model(config, export_dir):
  """COCO metrics or mIoU (per class too) of the SavedModel in `export_dir` as served, on `config`'s evaluation
  split."""
  from tfreward.export.served import ServedDetector, ServedSegmenter
  from tfreward.training import trainer
  served = ServedDetector if config.data.task == "detection" else ServedSegmenter
  return trainer.evaluate_model(config, served(export_dir, config.data.image_size), jit_compile=False,
                                per_class=True)


def _print_metrics(results):
  """One line of the summary metrics, then a table of the per-class ones ("IoU/<class>", "AP/<class>")."""
  summary = {k: v for k, v in results.items() if "/" not in k}
  print("evaluation:", ", ".join(f"{k}={v:.4f}" for k, v in summary.items()))
  per_class = {k: v for k, v in results.items() if "/" in k}
  if per_class:
    width = max(len(k.split("/", 1)[1]) for k in per_class)
    metric = next(iter(per_class)).split("/", 1)[0]
    print(f"  {'class'.ljust(width)}  {metric}")
    for key, value in per_class.items():
      print(f"  {key.split('/', 1)[1].ljust(width)}  {value:.4f}")


def _set_cluster(args):
  """--workers / --worker-index -> TF_CONFIG and runtime.strategy multi_worker."""
  if args.workers is None and args.worker_index is None:
    return
  from tfreward.config import ConfigError
  if args.workers is None or args.worker_index is None:
    raise ConfigError("--workers and --worker-index go together: every worker gets the same --workers list and its "
                      "own --worker-index.")
  from tfreward.strategy import tf_config_for_workers
  os.environ["TF_CONFIG"] = json.dumps(tf_config_for_workers(args.workers, args.worker_index))
  args.overrides.append("runtime.strategy=multi_worker")


def _train(args):
  from tfreward.config import load_config
  _set_cluster(args)
  config = load_config(args.config, args.overrides)
  if args.dry_run:
    from tfreward.training import dry_run
    print("\n".join(dry_run.describe(config)))
    return
  from tfreward.training import trainer
  name = os.path.splitext(os.path.basename(args.config))[0]
  model_dir = args.model_dir or os.path.join("runs", name)
  result = trainer.train(config, model_dir, evaluate=not args.no_eval, overwrite=args.overwrite)
  if result.already_complete:
    print(f"{model_dir} already holds this config's finished run: nothing to train (--overwrite retrains it).")
  if result.metrics:
    print("evaluation:", ", ".join(f"{k}={v:.4f}" for k, v in result.metrics.items()))
  if config.runtime.strategy == "multi_worker":
    print("final weights sha256:", result.weights_sha256)
  if not result.is_chief:
    print("worker done; the chief writes the model directory")
    return
  if args.export and not (result.already_complete and os.path.exists(os.path.join(model_dir, "export"))):
    print("exported to", _export(config, model_dir, max_decoded_side=args.max_decoded_side))
  print("model directory:", model_dir)


def _check_weights_fit(args, saved_config, config):
  """ConfigError when `evaluate`'s --set overrides change the shapes of the model's weights, which then no longer
  load from the run (the models are built only when an override touches the model, dataset, task or image size)."""
  from tfreward.config import ConfigError
  from tfreward.training import trainer

  def shaping(c):
    return c.model, trainer.dataset_spec(c).num_classes_for(c.data.task), tuple(c.data.image_size)

  if shaping(saved_config) == shaping(config):
    return
  run, new = ([(w.path, tuple(w.shape)) for w in trainer.build_model(c, compile_model=False).weights]
              for c in (saved_config, config))
  if [shape for _, shape in run] == [shape for _, shape in new]:
    return
  diff = next((f"{path.split('/', 1)[-1]} is {b} instead of {a}" for (_, a), (path, b) in zip(run, new) if a != b),
              f"{len(new)} weights instead of {len(run)}")
  shaping_keys = ("model.", "data.dataset=", "data.task=", "data.image_size=")
  culprits = [o for o in args.overrides if o.replace(" ", "").startswith(shaping_keys)] or args.overrides
  raise ConfigError(f"the weights in {args.model_dir} do not fit the model of the overridden config "
                    f"(--set {' --set '.join(culprits)}: {diff}); evaluate loads the run's trained weights, so "
                    "override only keys that keep the model's shape, e.g. data.eval_split, data.data_dir, "
                    "data.eval_batch_size, data.max_eval_examples or the model's score or NMS thresholds.")


def _check_data_args(args):
  """One-line errors for the arguments of `tfreward data build|preview`, each naming its flag."""
  from tfreward.data import shapes
  from tfreward.errors import UserError
  if args.dataset not in shapes.dataset_names():
    raise UserError(f"--dataset {args.dataset!r} is not a dataset the data command builds; choose one of "
                    f"{', '.join(shapes.dataset_names())}.")
  if args.data_command != "preview":
    return
  if args.split not in shapes.SPLIT_INDEX:
    raise UserError(f"--split {args.split!r} is not a split of {args.dataset}; choose "
                    f"{' or '.join(shapes.SPLIT_INDEX)}.")
  if args.num_images < 1:
    raise UserError(f"--num-images must be a positive number of images, got {args.num_images}.")
  if os.path.isdir(args.out):
    raise UserError(f"--out {args.out!r} is a directory; pass a PNG file path such as "
                    f"{os.path.join(args.out, 'preview.png')}.")


def _run(args):
  from tfreward.config import load_config
  if args.command == "train":
    _train(args)
  elif args.command == "evaluate":
    from tfreward.training import trainer
    saved = trainer.saved_config_dict(args.model_dir)
    config = load_config(copy.deepcopy(saved), args.overrides)
    if args.saved_model is None:
      _check_weights_fit(args, load_config(saved), config)
      results = trainer.evaluate(config, args.model_dir)
    else:
      results = _evaluate_saved_model(config, args.saved_model or os.path.join(args.model_dir, "export"))
    _print_metrics(results)
  elif args.command == "export":
    from tfreward.training import trainer
    config = load_config(trainer.saved_config_dict(args.model_dir))
    print("exported to", _export(config, args.model_dir, args.export_dir, args.max_decoded_side))
  elif args.command == "predict":
    from tfreward.export.predict import predict_files
    report = predict_files(args.saved_model, args.images, args.out, score_threshold=args.score_threshold)
    for path, reason in report.skipped:
      print(f"skipped {path}: {reason}", file=sys.stderr)
    if not report.written:
      from tfreward.errors import UserError
      raise UserError(f"none of the {len(report.skipped)} file(s) is a readable image.")
    print(f"wrote {len(report.written)} image(s) to {args.out} ({1000 * report.seconds_per_image:.0f} ms per image "
          "as served)" + (f"; detections in {report.detections_json}" if report.detections_json else ""))
  elif args.command == "curves":
    from tfreward.training import curves
    print(curves.compare_runs(args.model_dirs, labels=args.labels, metrics=args.metrics or ("mAP", "mAP50"),
                              out=args.out))
    if args.out:
      print("plot written to", args.out)
  elif args.command == "compare":
    from tfreward.training import compare
    if compare.runs_task(args.model_dirs) == "detection":
      if args.table:
        from tfreward.errors import UserError
        raise UserError("--table scores segmentation runs; for detection runs use `tfreward curves` or "
                        "`tfreward evaluate`.")
      print("comparison written to", compare.write_detection_comparison(
          args.out, args.model_dirs, args.labels, num_images=args.num_images, min_score=args.min_score))
    else:
      print("comparison written to", compare.write_segmentation_comparison(
          args.out, args.model_dirs, args.labels, num_images=args.num_images))
      if args.table:
        print(compare.segmentation_error_table(args.model_dirs, args.labels))
  elif args.command == "data":
    from tfreward.data import shapes
    _check_data_args(args)
    if args.data_command == "build":
      builder = shapes.ensure_built(args.dataset, args.data_dir)
      print(f"{args.dataset} ready in {builder.data_dir}")
    else:
      from tfreward.data.preview import write_preview
      path = write_preview(args.out, name=args.dataset, split=args.split, data_dir=args.data_dir,
                           num_images=args.num_images)
      print("preview written to", path)


def main(argv=None):
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  args = _parser().parse_args(argv)
  logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
  logging.getLogger("tfreward").setLevel(logging.INFO)
  from tfreward.errors import UserError
  try:
    _run(args)
  except (UserError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as e:
    print(f"tfreward: error: {' '.join(str(e).split())}", file=sys.stderr)  # One line, whatever the message.
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
