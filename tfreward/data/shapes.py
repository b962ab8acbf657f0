"""`tfreward_shapes`: a synthetic detection and segmentation dataset, generated locally (no download).

Importing this module registers the TFDS builder, so `tfds.builder("tfreward_shapes/256")` and `tfds.load` work.

Configs:
  "128"  (default) 128x128 images, train 4000 / validation 500.
  "256"  256x256 images (shapes scaled x2), train 4000 / validation 500.
  "test" 128x128 images, train 40 / validation 10: builds in seconds, for tests.
  "crowded" 128x128 images with 15-40 small shapes (6-24 pixels across), train 4000 / validation 500.
A custom `ShapesConfig(name=..., size=..., num_train=..., num_validation=..., scene=shapes_render.Scene(...))` may be
passed as `config=`.

Example i of split s is drawn by `shapes_render.render_example(example_seed(s, i), size=..., scene=...)`: it depends
only on (BASE_SEED, s, i), the image size and the scene, so configs with the same size and scene share their first
examples.

Features:
  image:             [S, S, 3] uint8 RGB.
  image/id:          int64 scalar, unique over all splits: 1 + i + 1_000_000 * (0 for train, 1 for validation).
  objects/bbox:      [N, 4] float32 yxyx normalised to [0, 1], the visible extent of the object's mask pixels.
  objects/label:     [N] int64 in [0, 6), indices into CLASS_NAMES. N in [1, 8] ([1, 40] for "crowded"), objects
                     in drawing order.
  segmentation_mask: [S, S, 1] uint8, 0 for background and label + 1 on each object's visible pixels.
"""

import dataclasses
import logging

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from tfreward.data import shapes_render

CLASS_NAMES = ("circle", "square", "triangle", "star", "ring", "cross")
NUM_CLASSES = len(CLASS_NAMES)
BASE_SEED = 20240611
SPLIT_INDEX = {"train": 0, "validation": 1}
ID_STRIDE = 1_000_000  # image/id = 1 + index + ID_STRIDE * SPLIT_INDEX[split].
NAME = "tfreward_shapes"

_LOG = logging.getLogger(__name__)
# Many small objects: where greedy maximum-likelihood decoding of a sequence detector stops early or repeats itself.
CROWDED = shapes_render.Scene(min_objects=15, max_objects=40, min_size=6.0, max_size=24.0)


def example_seed(split, index):
  """The seed of example `index` (int >= 0) of `split` ("train" or "validation"): a tuple of three ints."""
  if split not in SPLIT_INDEX:
    raise ValueError(f"split must be one of {tuple(SPLIT_INDEX)}, got {split!r}.")
  if int(index) < 0:
    raise ValueError(f"index must be >= 0, got {index!r}.")
  return (BASE_SEED, SPLIT_INDEX[split], int(index))


def image_id(split, index):
  """The int `image/id` of example `index` of `split`."""
  example_seed(split, index)  # Validates both arguments.
  return 1 + int(index) + ID_STRIDE * SPLIT_INDEX[split]


@dataclasses.dataclass(eq=False)
class ShapesConfig(tfds.core.BuilderConfig):
  """A `tfreward_shapes` config.

  Attributes:
    size: int >= 32. Image height and width in pixels; shape sizes scale with size / 128.
    num_train: int in [1, 1_000_000]. Number of train examples.
    num_validation: int in [1, 1_000_000]. Number of validation examples.
    scene: `shapes_render.Scene`, the number and size of the shapes. Defaults to 1-8 shapes of 8-64 pixels.
  """

  size: int = 128
  num_train: int = 4000
  num_validation: int = 500
  scene: shapes_render.Scene = shapes_render.Scene()

  def __post_init__(self):
    if not isinstance(self.size, int) or self.size < 32:
      raise ValueError(f"size must be an int >= 32, got {self.size!r}.")
    for field in ("num_train", "num_validation"):
      value = getattr(self, field)
      if not isinstance(value, int) or not 1 <= value <= ID_STRIDE:
        raise ValueError(f"{field} must be an int in [1, {ID_STRIDE}], got {value!r}.")
    if not isinstance(self.scene, shapes_render.Scene):
      raise ValueError(f"scene must be a shapes_render.Scene, got {self.scene!r}.")


class TfrewardShapes(tfds.core.GeneratorBasedBuilder):
  """Synthetic shapes (circle, square, triangle, star, ring, cross) with boxes and segmentation masks."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
      ShapesConfig(name="128", size=128, description="128x128 images, 4000 train / 500 validation."),
      ShapesConfig(name="256", size=256, description="256x256 images, 4000 train / 500 validation."),
      ShapesConfig(name="test", size=128, num_train=40, num_validation=10,
                   description="128x128 images, 40 train / 10 validation, for tests."),
      ShapesConfig(name="crowded", size=128, scene=CROWDED,
                   description="128x128 images of 15-40 small shapes (6-24 px), 4000 train / 500 validation."),
  ]
  DEFAULT_CONFIG_NAME = "128"

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    # TFDS 4.9.x resolves the default through `importlib_resources`, which it does not declare as a dependency
    # (tensorflow/datasets#11212); this file's own path is what that lookup returns anyway.
    return epath.Path(__file__)

  def _info(self):
    size = self.builder_config.size
    return self.dataset_info_from_configs(
        description=__doc__.splitlines()[0],
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(size, size, 3)),
            "image/id": np.int64,
            "objects": tfds.features.Sequence({
                "bbox": tfds.features.BBoxFeature(),
                "label": tfds.features.ClassLabel(names=CLASS_NAMES),
            }),
            "segmentation_mask": tfds.features.Image(shape=(size, size, 1)),
        }),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    config = self.builder_config
    return {
        "train": self._generate_examples("train", config.num_train),
        "validation": self._generate_examples("validation", config.num_validation),
    }

  def _generate_examples(self, split, num_examples):
    size, scene = self.builder_config.size, self.builder_config.scene
    for index in range(num_examples):
      example = shapes_render.render_example(example_seed(split, index), size=size, scene=scene)
      yield index, {
          "image": example["image"],
          "image/id": image_id(split, index),
          "objects": {"bbox": example["boxes"], "label": example["labels"]},
          "segmentation_mask": example["mask"][:, :, None],
      }


def dataset_names():
  """The names `ensure_built` accepts: "tfreward_shapes" and "tfreward_shapes/<config>" for each config."""
  return [NAME] + [f"{NAME}/{c}" for c in TfrewardShapes.builder_configs]


def parse_name(name):
  """"tfreward_shapes" or "tfreward_shapes/<config>" -> the config name ("128" for the bare name)."""
  if not isinstance(name, str):
    raise ValueError(f"name must be a str, got {name!r}.")
  dataset, slash, config = name.partition("/")
  config = config if slash else TfrewardShapes.DEFAULT_CONFIG_NAME
  if dataset != NAME or config not in TfrewardShapes.builder_configs:
    raise ValueError(f"name must be one of {dataset_names()}, got {name!r}.")
  return config


def ensure_built(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
  """Returns the builder of `name`, generating the dataset into `data_dir` first if it is not prepared.

  Args:
    name: str. "tfreward_shapes" (config "128") or "tfreward_shapes/<config>" with config "128", "256", "test" or
      "crowded".
    data_dir: str or None. TFDS data directory; None for the TFDS default (~/tensorflow_datasets).

  Returns:
    The prepared `tfds.core.DatasetBuilder`; call `as_dataset(split=...)` on it.
  """
  config = parse_name(name)
  builder = TfrewardShapes(config=config, data_dir=data_dir)
  if not builder.is_prepared():
    _LOG.info("Dataset %s is not prepared in %s: generating it now.", name, builder.data_dir)
    try:
      builder.download_and_prepare()
    except FileExistsError:
      # Another process (a second worker on a shared data dir) finished generating it first: TFDS writes into a
      # private incomplete dir and renames it at the end, so the one that exists is complete.
      builder = TfrewardShapes(config=config, data_dir=data_dir)
      if not builder.is_prepared():
        raise
  return builder


def load_shapes(split, *, name=NAME, data_dir=None, shuffle_files=False):
  """Builds `name` if needed and returns `split` ("train" or "validation") as a `tf.data.Dataset` of feature dicts."""
  if split not in SPLIT_INDEX:
    raise ValueError(f"split must be one of {tuple(SPLIT_INDEX)}, got {split!r}.")
  return ensure_built(name, data_dir).as_dataset(split=split, shuffle_files=shuffle_files)
