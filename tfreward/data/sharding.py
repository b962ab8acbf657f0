"""How the training input is split over input pipelines (one per host of a multi-worker or TPU pod run).

  example: every pipeline reads the one seeded global stream and keeps its rows of each global batch, so N hosts
           train on exactly the batches of one host (every host reads every record; it decodes only its own).
  file:    each pipeline reads only its own TFRecord files (`tfds.ReadConfig(input_context=...)`) and shuffles them
           itself: no host reads another's data, the stream depends on the number of hosts.
  auto:    file when the split has at least one file per pipeline, else example.
"""

from tfreward.config import INPUT_SHARDINGS
from tfreward.errors import DatasetError


def num_files(builder, split):
  """How many TFRecord files `split` (slices such as "train[:10%]" included) reads; None if TFDS cannot say."""
  try:
    return len(builder.info.splits[split].file_instructions)
  except (KeyError, ValueError, TypeError, AttributeError):
    return None


def resolve(input_sharding, files, pipelines):
  """"file" or "example" for `input_sharding` in INPUT_SHARDINGS, a split of `files` files (None: unknown) and
  `pipelines` input pipelines. "file" needs at least one file per pipeline."""
  if input_sharding not in INPUT_SHARDINGS:
    raise DatasetError(f"input_sharding must be one of {INPUT_SHARDINGS}, got {input_sharding!r}.")
  if pipelines == 1:
    return "example"  # One pipeline reads the whole stream: the two are the same.
  enough = files is not None and files >= pipelines
  if input_sharding == "file" and not enough:
    raise DatasetError(f"input_sharding 'file' needs at least one file per input pipeline: the split has "
                       f"{files if files is not None else 'an unknown number of'} file(s) for {pipelines} pipelines; "
                       "use 'example' or 'auto'.")
  if input_sharding == "auto":
    return "file" if enough else "example"
  return input_sharding


def prepared_num_files(dataset, split, data_dir=None):
  """Files of `split` of `dataset` when it is prepared in `data_dir`; None when it is not (nothing is generated or
  downloaded: for a dry run)."""
  import tensorflow_datasets as tfds  # Lazy: the module stays importable without loading TFDS.
  from tfreward.data import decoders
  spec = decoders.get_spec(dataset)
  if spec.tfds_name.startswith("tfreward_shapes"):
    from tfreward.data import shapes
    builder = shapes.TfrewardShapes(config=shapes.parse_name(spec.tfds_name), data_dir=data_dir)
  else:
    builder = tfds.builder(spec.tfds_name, data_dir=data_dir)
  return num_files(builder, split) if builder.is_prepared() else None
