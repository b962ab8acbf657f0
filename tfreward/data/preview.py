"""A PNG grid of dataset examples: each image with its labelled boxes, beside its colour-coded segmentation mask.

Layout (pixels), for images of size S and P = S * max(1, 256 // S) (panels are upscaled, nearest neighbour):
  a header strip of HEADER (title and class legend), then rows of cells separated and surrounded by PAD;
  a cell is a CAPTION line (image id, object count) above two P x P panels side by side with PAD between them.
  width  = columns * (2 * P + PAD) + (columns + 1) * PAD
  height = HEADER + rows * (CAPTION + P) + (rows + 1) * PAD, rows = ceil(num_images / columns).
Boxes are drawn just outside the object's pixels (a 2-pixel frame in the class colour), so they hug visible objects
without covering them; the same boxes are drawn in white on the mask panel, to check boxes and masks agree.
"""

import math

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, ImageDraw, ImageFont

from tfreward.data import shapes
from tfreward.data import statistics

HEADER, CAPTION, PAD = 28, 16, 8
BACKGROUND = (24, 24, 24)
PALETTE = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40))


def class_colour(label):
  """RGB tuple of class `label` (int >= 0); the palette repeats after 12 classes."""
  return PALETTE[int(label) % len(PALETTE)]


def default_font(size):
  """Pillow's default font at `size` pixels (its fixed bitmap font before Pillow 10.1)."""
  try:
    return ImageFont.load_default(size=size)
  except TypeError:  # Pillow < 10.1 has only the fixed bitmap font.
    return ImageFont.load_default()


def text_colour(rgb):
  """Black or white, whichever reads better on `rgb`."""
  return (0, 0, 0) if 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2] > 140 else (255, 255, 255)


def _frame(draw, box, panel, colour, width):
  """Draws a frame `width` pixels thick just outside the pixel edges of a yxyx box normalised to `panel`."""
  y0, x0, y1, x1 = (np.asarray(box, np.float64) * panel).round().astype(int)
  draw.rectangle([x0 - width, y0 - width, x1 - 1 + width, y1 - 1 + width], outline=colour, width=width)
  return x0, y0


def _image_panel(image, boxes, labels, class_names, factor, font, names=True):
  """[S, S, 3] uint8 -> a P x P PIL image with boxes in their class colours, named unless `names` is False."""
  panel = Image.fromarray(image).resize((image.shape[1] * factor, image.shape[0] * factor), Image.NEAREST)
  draw = ImageDraw.Draw(panel)
  size = panel.size[0]
  for box, label in zip(boxes, labels):
    colour = class_colour(label)
    x0, y0 = _frame(draw, box, size, colour, 2)
    if not names:
      continue
    text = class_names[label] if label < len(class_names) else str(label)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    width, height = right - left + 4, bottom - top + 2
    tx = min(max(x0 - 2, 0), size - width)
    ty = y0 - 2 - height if y0 - 2 - height >= 0 else y0
    draw.rectangle([tx, ty, tx + width - 1, ty + height - 1], fill=colour)
    draw.text((tx + 2 - left, ty + 1 - top), text, fill=text_colour(colour), font=font)
  return panel


def _mask_panel(mask, boxes, factor):
  """[S, S] uint8 (0 background, label + 1) -> a P x P PIL image, classes in their colours, boxes in white."""
  lut = np.array([BACKGROUND] + [class_colour(k) for k in range(255)], np.uint8)  # [256, 3]
  panel = Image.fromarray(lut[mask]).resize((mask.shape[1] * factor, mask.shape[0] * factor), Image.NEAREST)
  draw = ImageDraw.Draw(panel)
  for box in boxes:
    _frame(draw, box, panel.size[0], (255, 255, 255), 1)
  return panel


def _canvas(width, height, title, class_names):
  """A blank canvas with the header strip (title, then each class's colour and name): (image, draw, font)."""
  canvas = Image.new("RGB", (width, height), BACKGROUND)
  draw = ImageDraw.Draw(canvas)
  font = default_font(12)
  draw.text((PAD, 7), title, fill=(255, 255, 255), font=font)
  x = PAD + int(draw.textlength(title, font=font)) + 3 * PAD
  for label, name in enumerate(class_names):
    draw.rectangle([x, 8, x + 11, 19], fill=class_colour(label))
    draw.text((x + 16, 7), name, fill=(255, 255, 255), font=font)
    x += 16 + int(draw.textlength(name, font=font)) + 2 * PAD
  return canvas, draw, font


def _column_grid(num_rows, size, headers, title, class_names):
  """A canvas of `num_rows` x len(headers) panels of P x P (images of size S upscaled), each column under its header.

  Returns:
    canvas, font, the upscaling factor, and origin(row, column) -> the (x, y) of that panel's top-left corner.
  """
  factor = max(1, 256 // size)
  panel = size * factor
  width = len(headers) * panel + (len(headers) + 1) * PAD
  height = HEADER + CAPTION + num_rows * (panel + PAD) + PAD
  canvas, draw, font = _canvas(width, height, title, class_names)
  origin = lambda row, column: (PAD + column * (panel + PAD), HEADER + CAPTION + row * (panel + PAD))
  for column, header in enumerate(headers):
    draw.text((origin(0, column)[0], HEADER + 1), header, fill=(200, 200, 200), font=font)
  return canvas, font, factor, origin


def render_grid(examples, *, class_names, columns=4, title=""):
  """Draws the preview grid.

  Args:
    examples: list of dicts of numpy arrays with the `tfreward_shapes` features: "image" [S, S, 3] uint8,
      "image/id" int64, "objects" {"bbox": [N, 4] float32 yxyx normalised, "label": [N] int64},
      "segmentation_mask" [S, S, 1] uint8 (0 background, label + 1). All images have the same size.
    class_names: sequence of str, indexed by label.
    columns: int >= 1.
    title: str drawn in the header.

  Returns:
    An RGB `PIL.Image.Image` of the size given in the module docstring.
  """
  if not examples:
    raise ValueError(f"examples must not be empty, got {examples!r}.")
  if not isinstance(columns, int) or columns < 1:
    raise ValueError(f"columns must be an int >= 1, got {columns!r}.")
  size = examples[0]["image"].shape[0]
  factor = max(1, 256 // size)
  panel = size * factor
  rows = math.ceil(len(examples) / columns)
  width = columns * (2 * panel + PAD) + (columns + 1) * PAD
  height = HEADER + rows * (CAPTION + panel) + (rows + 1) * PAD
  canvas, draw, font = _canvas(width, height, title, class_names)
  for index, example in enumerate(examples):
    row, column = divmod(index, columns)
    left = PAD + column * (2 * panel + 2 * PAD)
    top = HEADER + PAD + row * (CAPTION + panel + PAD)
    boxes = np.asarray(example["objects"]["bbox"], np.float32).reshape(-1, 4)
    labels = np.asarray(example["objects"]["label"], np.int64).reshape(-1)
    caption = f"id {int(example['image/id'])}: {len(labels)} object{'s' if len(labels) != 1 else ''}"
    draw.text((left, top + 1), caption, fill=(200, 200, 200), font=font)
    canvas.paste(_image_panel(example["image"], boxes, labels, class_names, factor, font), (left, top + CAPTION))
    mask = np.asarray(example["segmentation_mask"]).reshape(size, size)
    canvas.paste(_mask_panel(mask, boxes, factor), (left + panel + PAD, top + CAPTION))
  return canvas


def write_preview(path, *, name=shapes.NAME, split="train", data_dir=None, num_images=16, columns=4):
  """Builds `name` if needed and writes a PNG grid of its first `num_images` examples of `split`; prints the split's
  count of degenerate boxes (`statistics.degenerate_box_count`, dropped from the training labels).

  Args:
    path: str or path-like. Output PNG file; parent directories must exist.
    name: str. "tfreward_shapes" or "tfreward_shapes/<config>" (see `shapes.ensure_built`).
    split: str. "train" or "validation".
    data_dir: str or None. TFDS data directory; None for the TFDS default.
    num_images: int >= 1. Fewer are drawn if the split is smaller.
    columns: int >= 1. Cells per row.

  Returns:
    `path`, unchanged.
  """
  if not isinstance(num_images, int) or num_images < 1:
    raise ValueError(f"num_images must be an int >= 1, got {num_images!r}.")
  if not isinstance(columns, int) or columns < 1:
    raise ValueError(f"columns must be an int >= 1, got {columns!r}.")
  if split not in shapes.SPLIT_INDEX:
    raise ValueError(f"split must be one of {tuple(shapes.SPLIT_INDEX)}, got {split!r}.")
  builder = shapes.ensure_built(name, data_dir)
  dataset = builder.as_dataset(split=split, shuffle_files=False).take(num_images)
  examples = list(tfds.as_numpy(dataset))
  class_names = builder.info.features["objects"]["label"].names
  title = f"{name} {split}: {len(examples)} examples"
  grid = render_grid(examples, class_names=class_names, columns=columns, title=title)
  grid.save(path, format="PNG", compress_level=1)  # Fast; the noisy images barely compress anyway.
  counts = statistics.degenerate_box_count(name, split=split, data_dir=data_dir)
  print(f"{name} {split}: {counts['degenerate']} of {counts['boxes']} boxes in {counts['examples']} examples have "
        "no positive extent (dropped from the training labels)")
  return path


def render_label_maps(images, label_maps, *, class_names, title=""):
  """One row per image: the image, then one panel per named label map (e.g. ground truth, model A, model B).

  Args:
    images: [N, S, S, 3] uint8.
    label_maps: dict column name -> [N, S, S] int label maps (0 is drawn in the background colour, value k in
      `class_colour(k - 1)`, the `tfreward_shapes` mask convention; 255 = ignore in that of label 254).
    class_names: names of the labels 1, 2, ... for the legend.
    title: str drawn in the header.

  Returns:
    An RGB `PIL.Image.Image`.
  """
  images = np.asarray(images)
  if images.ndim != 4 or not label_maps:
    raise ValueError(f"need images [N, S, S, 3] and at least one label map, got {images.shape} and "
                     f"{list(label_maps)}.")
  headers = ("image",) + tuple(label_maps)
  canvas, font, factor, origin = _column_grid(len(images), images.shape[1], headers, title, class_names)
  for row, image in enumerate(images):
    panel = image.shape[0] * factor
    canvas.paste(Image.fromarray(image).resize((panel, panel), Image.NEAREST), origin(row, 0))
    for column, maps in enumerate(label_maps.values(), start=1):
      mask = np.clip(np.asarray(maps[row]), 0, 255).astype(np.uint8)
      canvas.paste(_mask_panel(mask, [], factor), origin(row, column))
  return canvas


def render_box_columns(images, columns, *, class_names, title="", max_named=12):
  """One row per image: one panel per named set of boxes (e.g. ground truth, model A, model B) on the image.

  Args:
    images: [N, S, S, 3] uint8.
    columns: dict column name -> list of N (boxes [K, 4] yxyx normalised, labels [K] int) pairs.
    class_names: names of the labels, for the legend and the box captions.
    title: str drawn in the header.
    max_named: boxes are captioned with their class name only in panels of at most this many boxes (crowded
      panels show the frames, in the class colours).

  Returns:
    An RGB `PIL.Image.Image`; each column's header says how many boxes it draws per image on average.
  """
  images = np.asarray(images)
  if images.ndim != 4 or not columns:
    raise ValueError(f"need images [N, S, S, 3] and at least one column of boxes, got {images.shape} and "
                     f"{list(columns)}.")
  headers = [f"{name} ({sum(len(labels) for _, labels in sets) / max(len(sets), 1):.1f} boxes)"
             for name, sets in columns.items()]
  canvas, font, factor, origin = _column_grid(len(images), images.shape[1], headers, title, class_names)
  for column, sets in enumerate(columns.values()):
    for row, (boxes, labels) in enumerate(sets):
      boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
      labels = np.asarray(labels, np.int64).reshape(-1)
      cell = _image_panel(images[row], boxes, labels, class_names, factor, font, names=len(labels) <= max_named)
      canvas.paste(cell, origin(row, column))
  return canvas
