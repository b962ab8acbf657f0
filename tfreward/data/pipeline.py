"""tf.data input pipelines for tfreward_shapes, COCO and Cityscapes: static shapes, per-replica batches.

Each element is `(images, labels)` for one replica:
  images: [B, H, W, 3] uint8, the image resized keeping its aspect ratio and padded bottom/right to `image_size`
    (training: scale jitter and random crop on top, see `tfreward.data.augment`).
  labels, detection:
    boxes:   [B, M, 4] float32 yxyx normalised to the padded canvas, 0 for padding.
    classes: [B, M] int32, 0-based, -1 for padding.
    valid:   [B, M] bool, the training targets. Training drops boxes without extent (zero-area, inverted; see
             `tfreward.data.augment`); evaluation keeps them valid, as COCO's evaluation counts them (the losses
             treat a valid box without positive extent as padding).
    crowd:   [B, M] bool, evaluation only: COCO crowd regions, kept with valid=False and their real class (in
             training they are dropped; other datasets have none).
    M = `max_instances`: an image with more instances keeps the first M in dataset order (evaluation counts the
    crowd regions among them; training counts only the instances that survive the crop).
  labels, segmentation:
    mask:    [B, H, W] int32 class ids, 255 (ignore) for unlabelled pixels and the padded area.
  labels, both:
    image_id: [B] int64 (-1 for padding examples); image_hw: [B, 2] int32 original size; scale: [B] float32
    canvas pixels per original pixel (map boxes back with `transforms.canvas_boxes_to_original_pixels`);
    example_valid: [B] bool, False for the dummy examples that pad the last evaluation batch.

Training shuffles, repeats, augments and drops the remainder; several input pipelines (hosts) split it by example
or by file (`tfreward.data.sharding`). Evaluation keeps every example once, in order:
global batch g of the split is split into consecutive per-replica slices (input pipeline p of P gets the rows
[p * G / P, (p + 1) * G / P) of every global batch), and the last global batch is padded with dummy examples, so
every replica gets the same number of full batches.
"""

import numbers
import random

import tensorflow as tf
import tensorflow_datasets as tfds

from tfreward.data import augment
from tfreward.data import decoders
from tfreward.data import sharding as sharding_lib
from tfreward.data import transforms
from tfreward.config import TASKS
from tfreward.errors import DatasetError

_AUTOTUNE = tf.data.AUTOTUNE


def dataset_spec(dataset, data_dir=None, manual_dir=None):
  """The `DatasetSpec` (classes, tasks, ignore index) of `dataset`, one of `decoders.KNOWN_DATASETS`.

  The metadata is static: `data_dir` and `manual_dir` are accepted so a data config can be passed as a whole,
  and are not read (no dataset is built or opened).
  """
  del data_dir, manual_dir
  return decoders.get_spec(dataset)


def _is_int(value):
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_arguments(spec, task, image_size, global_batch_size, max_instances, shuffle_buffer, scale_range,
                     max_examples, num_replicas):
  if task not in TASKS:
    raise DatasetError(f"task must be one of {TASKS}, got {task!r}.")
  if task not in spec.tasks:
    raise DatasetError(f"dataset {spec.name!r} supports only {', '.join(spec.tasks)}, got task {task!r}; "
                     f"choose another dataset or task.")
  size = tuple(image_size) if isinstance(image_size, (tuple, list)) else (image_size,)
  if len(size) != 2 or not all(_is_int(v) and v > 0 for v in size):
    raise DatasetError(f"image_size must be two positive integers (height, width), got {image_size!r}.")
  for name, value in (("global_batch_size", global_batch_size), ("max_instances", max_instances),
                      ("shuffle_buffer", shuffle_buffer)):
    if not _is_int(value) or value <= 0:
      raise DatasetError(f"{name} must be a positive integer, got {value!r}.")
  if len(scale_range) != 2 or not 0.0 < float(scale_range[0]) <= float(scale_range[1]):
    raise DatasetError(f"scale_range must be (min, max) with 0 < min <= max, got {scale_range!r}.")
  if max_examples is not None and (not _is_int(max_examples) or max_examples <= 0):
    raise DatasetError(f"max_examples must be None or a positive integer, got {max_examples!r}.")
  if global_batch_size % num_replicas:
    raise DatasetError(f"global_batch_size {global_batch_size} is not divisible by the {num_replicas} replicas; "
                     f"use a multiple of {num_replicas}.")


def prepare_dataset(dataset, data_dir=None, manual_dir=None):
  """Generates `dataset` (tfreward_shapes) or prepares it from its manual download (Cityscapes) if it is not yet
  prepared in `data_dir`; returns its TFDS builder. Never downloads anything.

  Generating a dataset draws from the global random state that `keras.utils.set_random_seed` seeds, so the trainer
  prepares the data before it seeds: a run then starts from the same weights whether or not the data existed.
  """
  return _load_builder(decoders.get_spec(dataset), data_dir, manual_dir)


def _load_builder(spec, data_dir, manual_dir):
  """The TFDS builder of `spec`; prepares Cityscapes from its manual download, never downloads anything."""
  if spec.tfds_name.startswith("tfreward_shapes"):
    from tfreward.data import shapes  # The synthetic builder: generated locally, no download.
    return shapes.ensure_built(spec.tfds_name, data_dir)
  builder = tfds.builder(spec.tfds_name, data_dir=data_dir)
  if spec.manual_files and not builder.is_prepared():
    decoders.check_manual_dir(spec, data_dir, manual_dir)
    try:
      builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    except tfds.core.download.extractor.ExtractError as e:  # An empty, truncated or non-zip manual file.
      raise decoders.unreadable_manual_file(spec, manual_dir, e) from None
  return builder


def check_mask_values(mask, num_classes, ignore_index, dataset):
  """`mask` int [H, W] unchanged, after checking every value is a class in [0, num_classes) or `ignore_index`;
  otherwise iterating the dataset fails with InvalidArgumentError naming the first bad value (never a silent
  clamp: a bad label would otherwise train as "ignore" or as the wrong class)."""
  mask = tf.convert_to_tensor(mask)
  bad = (mask < 0) | ((mask >= num_classes) & (mask != ignore_index))
  check = tf.debugging.Assert(
      tf.logical_not(tf.reduce_any(bad)),
      [f"{dataset}: a segmentation mask holds a value outside the classes [0, {num_classes}) and the ignore index "
       f"{ignore_index}; first bad value:", tf.reduce_max(tf.where(bad, mask, tf.reduce_min(mask)))])
  with tf.control_dependencies([check]):
    return tf.identity(mask)


def read_examples(builder, spec, split):
  """Every TFDS example of `split` once, in file order, images still encoded (`decoders.decode_example` decodes)."""
  return _read(builder, spec, split, shuffle_files=False, seed=None)


def _read(builder, spec, split, *, shuffle_files, seed, input_context=None):
  """TFDS examples of `split` with images still encoded (only `input_context`'s files when given); a clear error
  when the data is not prepared."""
  try:
    return builder.as_dataset(split=split, shuffle_files=shuffle_files, decoders=decoders.skip_decoding(spec),
                              read_config=tfds.ReadConfig(shuffle_seed=seed, input_context=input_context))
  except AssertionError as e:  # TFDS reports a missing dataset with an AssertionError: "could not find data".
    if "could not find data" not in str(e):
      raise
    raise DatasetError(
        f"dataset {spec.tfds_name!r} is not prepared in {builder.data_dir_root}; build it once with "
        f"`tfds build {spec.tfds_name} --data_dir <dir>` and pass data_dir=<dir> (or set data_dir to where it "
        f"is prepared).") from None


def _pack_instances(boxes, classes, crowd, keep, max_instances):
  """Compacts the kept instances to the front (order preserved), truncates or pads to `max_instances`.

  Args:
    boxes: [N, 4] float32; classes: [N] int32; crowd: [N] bool; keep: [N] bool.
  Returns:
    boxes [M, 4] float32 (0 for padding), classes [M] int32 (-1), valid [M] bool (kept and not crowd),
    crowd [M] bool.
  """
  order = tf.argsort(tf.cast(tf.logical_not(keep), tf.int32), stable=True)[:max_instances]  # [min(N, M)]
  count = tf.minimum(tf.reduce_sum(tf.cast(keep, tf.int32)), max_instances)
  used = tf.range(max_instances) < count  # [M]
  pad = max_instances - tf.shape(order)[0]
  boxes = tf.pad(tf.gather(boxes, order), [[0, pad], [0, 0]])
  classes = tf.pad(tf.gather(classes, order), [[0, pad]])
  crowd = tf.pad(tf.gather(crowd, order), [[0, pad]])
  boxes = tf.ensure_shape(tf.where(used[:, None], boxes, 0.0), [max_instances, 4])
  classes = tf.ensure_shape(tf.where(used, classes, -1), [max_instances])
  crowd = tf.ensure_shape(tf.logical_and(used, crowd), [max_instances])
  return boxes, classes, tf.logical_and(used, tf.logical_not(crowd)), crowd


def _element(example, *, task, training, image, boxes, keep, mask, scale, max_instances):
  """Assembles one fixed-shape `(image, labels)` element from the processed pieces."""
  labels = {
      "image_id": example["image_id"],
      "image_hw": tf.shape(example["image"])[:2],
      "scale": tf.cast(scale, tf.float32),
      "example_valid": tf.constant(True),
  }
  if task == "segmentation":
    labels["mask"] = mask
  else:
    crowd = example["crowd"]
    if training:  # Crowd regions are no training targets: drop them before packing.
      keep = tf.logical_and(keep, tf.logical_not(crowd))
    labels["boxes"], labels["classes"], labels["valid"], crowd = _pack_instances(
        boxes, example["classes"], crowd, keep, max_instances)
    if not training:
      labels["crowd"] = crowd
  return image, labels


def _train_element(example, seed, *, task, image_size, max_instances, hflip, scale_range):
  """Random flip and scale jitter with crop/pad, then fixed-size labels. `seed`: [2] int64."""
  flip_seed, scale_seed = tf.unstack(tf.random.experimental.stateless_split(seed, num=2))
  image, boxes = example["image"], example["boxes"]
  mask = example["mask"] if task == "segmentation" else None
  if hflip:
    image, boxes, mask = augment.random_horizontal_flip(image, boxes, mask, seed=flip_seed)
  image, boxes, keep, mask, scale = augment.random_scale_crop(
      image, boxes, mask, output_hw=image_size, scale_range=scale_range, seed=scale_seed,
      mask_pad_value=decoders.IGNORE_INDEX)
  return _element(example, task=task, training=True, image=image, boxes=boxes, keep=keep, mask=mask,
                  scale=scale, max_instances=max_instances)


def _eval_element(example, *, task, image_size, max_instances):
  """Fit-to-canvas resize and pad (the serving geometry), then fixed-size labels."""
  image_hw = tf.shape(example["image"])[:2]
  image, scale = transforms.resize_and_pad(example["image"], image_size)
  image = tf.saturate_cast(tf.round(image), tf.uint8)
  boxes = tf.clip_by_value(transforms.original_boxes_to_canvas(example["boxes"], image_hw, scale, image_size),
                           0.0, 1.0)
  mask = None
  if task == "segmentation":
    # resize_and_pad pads with 0: shift the labels so that the ignore index is 0, then shift back.
    shifted, _ = transforms.resize_and_pad(example["mask"][..., None] - decoders.IGNORE_INDEX, image_size,
                                           scale=scale, method="nearest")
    mask = shifted[..., 0] + decoders.IGNORE_INDEX
  keep = tf.ones_like(example["classes"], tf.bool)
  return _element(example, task=task, training=False, image=image, boxes=boxes, keep=keep, mask=mask,
                  scale=scale, max_instances=max_instances)


def _dummy_element(element_spec):
  """An all-padding `(image, labels)` element matching `element_spec` (example_valid False)."""
  images_spec, labels_spec = element_spec
  fill = {"classes": -1, "mask": decoders.IGNORE_INDEX, "image_id": -1, "scale": 1}
  labels = {key: tf.fill(spec.shape, tf.cast(fill.get(key, 0), spec.dtype)) for key, spec in labels_spec.items()}
  return tf.zeros(images_spec.shape, images_spec.dtype), labels


def build_dataset(*, dataset, task, split, training, image_size, global_batch_size, max_instances=100,
                  data_dir=None, manual_dir=None, shuffle_buffer=1000, hflip=True, scale_range=(0.8, 1.25),
                  max_examples=None, seed=None, input_context=None, input_sharding="auto", start_batch=0):
  """Builds the input pipeline of one input worker (see the module docstring for the element structure).

  Args:
    dataset: str, a name in `decoders.KNOWN_DATASETS` ("tfreward_shapes", "tfreward_shapes/256", "coco/2017",
      "cityscapes").
    task: str, "detection" or "segmentation" (as the dataset supports).
    split: str, a TFDS split ("train", "validation", "train[:10%]", ...).
    training: bool. True: shuffle, repeat, augment, drop the remainder. False: every example once, in order.
    image_size: (int, int), the canvas height and width.
    global_batch_size: int, divisible by the number of replicas.
    max_instances: int, M. Defaults to 100.
    data_dir: optional TFDS data directory. Defaults to TFDS's default.
    manual_dir: optional folder with Cityscapes' manual download (leftImg8bit_trainvaltest.zip and
      gtFine_trainvaltest.zip). When Cityscapes is not prepared in `data_dir` it is prepared from there once
      (local files only, slow); other datasets are never downloaded: an unprepared COCO is an error.
    shuffle_buffer: int, examples in the shuffle buffer (encoded, so cheap). Defaults to 1000.
    hflip: bool, random horizontal flips in training. Defaults to True.
    scale_range: (float, float), scale jitter in training. Defaults to (0.8, 1.25).
    max_examples: optional int, use only the first examples of the split.
    seed: optional int, makes shuffling and augmentation reproducible.
    input_context: optional `tf.distribute.InputContext`; batches are per replica and sharded by input pipeline.
    input_sharding: str, how training input is split over several input pipelines (`sharding.resolve`):
      "example": every pipeline reads the one seeded global stream and keeps its rows of each global batch
      (pipeline p of P: rows [p * G / P, (p + 1) * G / P)), so the global batches do not depend on P; "file": each
      pipeline reads its own files (`tfds.ReadConfig(input_context=...)`) and shuffles them itself; "auto": "file"
      when the split has at least one file per pipeline. Defaults to "auto".
    start_batch: int, training only: global batches already trained on (a resumed run); the stream starts after
      them, so a resumed run sees the batches an uninterrupted one would. Defaults to 0.

  Returns:
    A `tf.data.Dataset` of `(images, labels)` with fully static shapes, batch `B` = per-replica batch size.
  """
  spec = decoders.get_spec(dataset)
  decoders.check_split(spec, split)
  num_replicas = input_context.num_replicas_in_sync if input_context else 1
  _check_arguments(spec, task, image_size, global_batch_size, max_instances, shuffle_buffer, scale_range,
                   max_examples, num_replicas)
  image_size = (int(image_size[0]), int(image_size[1]))
  batch = input_context.get_per_replica_batch_size(global_batch_size) if input_context else global_batch_size
  pipelines = input_context.num_input_pipelines if input_context else 1
  pipeline_id = input_context.input_pipeline_id if input_context else 0
  # Several input pipelines shard one example order, so their file order must agree: seeded even without `seed`.
  file_seed = seed if seed is not None else (0 if pipelines > 1 else None)
  if seed is None:
    seed = random.SystemRandom().randrange(2**31)
  builder = _load_builder(spec, data_dir, manual_dir)
  sharding = sharding_lib.resolve(input_sharding, sharding_lib.num_files(builder, split), pipelines) if training else "example"
  if sharding == "file" and max_examples is not None:
    raise DatasetError("max_examples cannot be combined with input_sharding 'file' (each pipeline would take its "
                       "own first examples); use 'example'.")
  if not _is_int(start_batch) or start_batch < 0:
    raise DatasetError(f"start_batch must be a non-negative integer, got {start_batch!r}.")
  examples = _read(builder, spec, split, shuffle_files=training, seed=file_seed,
                   input_context=input_context if sharding == "file" else None)
  if max_examples is not None:
    examples = examples.take(max_examples)

  def decode(example):
    decoded = decoders.decode_example(spec, example, features=builder.info.features)
    if task == "segmentation":
      decoded["mask"] = check_mask_values(decoded["mask"], spec.num_segmentation_classes, spec.ignore_index,
                                          spec.name)
    return decoded

  if training:
    rows = global_batch_size // pipelines  # Rows of each global batch that this pipeline serves.
    ds = examples.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True).repeat().enumerate()
    if sharding == "file":  # Own files, own shuffle: the augmentation seeds differ by pipeline.
      base_seed = tf.constant([seed, pipeline_id], tf.int64)
    else:  # One global stream: example i of it gets the same augmentation whichever pipeline keeps it.
      base_seed = tf.constant([seed, 0], tf.int64)
      if pipelines > 1:
        ds = ds.filter(lambda index, _: tf.equal(index % global_batch_size // rows, pipeline_id))
    ds = ds.skip(start_batch * rows)  # Before decoding: skipping reads records, it decodes nothing.
    ds = ds.map(lambda index, example: _train_element(
        decode(example), tf.random.experimental.stateless_fold_in(base_seed, index), task=task,
        image_size=image_size, max_instances=max_instances, hflip=hflip, scale_range=scale_range),
                num_parallel_calls=_AUTOTUNE)
    return ds.batch(batch, drop_remainder=True).prefetch(_AUTOTUNE)

  count = examples.cardinality()
  static_count = tf.get_static_value(count)
  if static_count is not None and static_count < 0:
    raise DatasetError(f"evaluation needs a split of known size, got cardinality {static_count} for split {split!r}.")
  rows = global_batch_size // pipelines  # Rows of each global batch that this pipeline serves.
  if rows * pipelines != global_batch_size or rows % batch:
    raise DatasetError(f"{pipelines} input pipelines cannot split global batches of {global_batch_size} into "
                     f"per-replica batches of {batch}; use replicas divisible by input pipelines.")
  if pipelines > 1:
    examples = examples.enumerate().filter(
        lambda index, _: tf.equal(index % global_batch_size // rows, pipeline_id)).map(lambda _, example: example)
  ds = examples.map(lambda example: _eval_element(decode(example), task=task, image_size=image_size,
                                                  max_instances=max_instances), num_parallel_calls=_AUTOTUNE)
  padded_total = (count + global_batch_size - 1) // global_batch_size * global_batch_size
  dummies = tf.data.Dataset.from_tensors(_dummy_element(ds.element_spec)).repeat()
  ds = ds.concatenate(dummies).take(padded_total // pipelines)
  return ds.batch(batch, drop_remainder=True).prefetch(_AUTOTUNE)


def distributed_dataset(strategy, **build_kwargs):
  """`build_dataset(**build_kwargs)` for every input worker of `strategy`, as a distributed dataset.

  Args:
    strategy: a `tf.distribute.Strategy`.
    **build_kwargs: keyword arguments of `build_dataset`, except `input_context` (the strategy supplies it).
  """
  if "input_context" in build_kwargs:
    raise DatasetError(f"input_context is supplied by the strategy, got {build_kwargs['input_context']!r}.")
  return strategy.distribute_datasets_from_function(
      lambda input_context: build_dataset(**build_kwargs, input_context=input_context))
