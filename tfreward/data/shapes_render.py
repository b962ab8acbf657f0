"""Draws one synthetic "shapes" example from a seed, in pure numpy (host side, used by the TFDS builder).

A scene is a textured background (a two-colour gradient, soft blobs, optional stripes) with solid shapes (1-8 by
default; `Scene` sets their count and sizes) drawn back to front. Each shape is a vectorised mask over the pixel centres of its own crop. A shape is placed only if
every shape drawn before it stays at least `MIN_VISIBLE_FRACTION` visible (otherwise a new placement is tried, and
after `MAX_PLACEMENT_TRIES` the shape is skipped), so no object ends up hidden. Each shape gets a random colour
(the best of up to 32 draws, aiming at `MIN_CONTRAST` from the mean colour of every region in its crop: background
and earlier objects) with a slight vertical shading. Boxes are the visible extent of each object's pixels in the
instance map, so boxes and masks agree exactly. Per-pixel Gaussian noise is added last.

Random draws are made in units of a 128-pixel image and scaled to `size`, so size 256 gives shapes twice as large.
"""

import dataclasses

import numpy as np

NUM_SHAPE_CLASSES = 6  # circle, square, triangle, star, ring, cross (the order of `shapes.CLASS_NAMES`).
MAX_OBJECTS = 8
MIN_SIZE, MAX_SIZE = 8.0, 64.0  # Diameter of the circle around a shape, in pixels of a 128-pixel image.
MIN_VISIBLE_FRACTION = 0.5
MAX_PLACEMENT_TRIES = 20
MIN_AREA = 12  # Pixels (at 128) a shape must cover when drawn unoccluded.
MIN_CONTRAST = 90.0  # Euclidean RGB distance from an object's colour to the mean colour of each region it meets.

_CIRCLE, _SQUARE, _TRIANGLE, _STAR, _RING, _CROSS = range(NUM_SHAPE_CLASSES)


@dataclasses.dataclass(frozen=True)
class Scene:
  """How many shapes a scene holds and how large they are (diameters in pixels of a 128-pixel image).

  The defaults are the original scenes (their examples are unchanged). Attempts: a count is drawn uniformly in
  [min_objects, max_objects]; a shape that cannot be placed (see the module docstring) is skipped, so crowded scenes
  may hold a few fewer.
  """
  min_objects: int = 1
  max_objects: int = MAX_OBJECTS
  min_size: float = MIN_SIZE
  max_size: float = MAX_SIZE

  def __post_init__(self):
    if not (isinstance(self.min_objects, int) and isinstance(self.max_objects, int)
            and 1 <= self.min_objects <= self.max_objects <= 254):
      raise ValueError(f"need ints 1 <= min_objects <= max_objects <= 254, got {self.min_objects!r}, "
                       f"{self.max_objects!r}.")
    if not 4.0 <= self.min_size <= self.max_size:
      raise ValueError(f"need 4 <= min_size <= max_size (pixels at 128), got {self.min_size!r}, {self.max_size!r}.")


def _regular_polygon(u, v, radius, sides):
  """Inside test for a regular polygon with circumradius `radius`, a vertex on the +u axis."""
  normals = (2.0 * np.arange(sides) + 1.0) * np.pi / sides  # [sides] edge-normal angles
  proj = u[..., None] * np.cos(normals) + v[..., None] * np.sin(normals)  # [h, w, sides]
  return proj.max(axis=-1) <= radius * np.cos(np.pi / sides)


def _star(u, v, radius, inner_ratio=0.45, points=5):
  """Inside test for a star: tips at `radius`, inner vertices at `inner_ratio * radius`."""
  sector = 2.0 * np.pi / points
  rho = np.hypot(u, v)
  t = np.mod(np.arctan2(v, u), sector)  # Angle from the previous tip.
  b = 0.5 * sector - np.abs(t - 0.5 * sector)  # Folded: 0 at a tip, sector / 2 at an inner vertex.
  qx, qy = rho * np.cos(b), rho * np.sin(b)
  inner = inner_ratio * radius
  dx, dy = inner * np.cos(0.5 * sector) - radius, inner * np.sin(0.5 * sector)  # Tip -> inner vertex.
  return dx * qy - dy * (qx - radius) >= 0.0


def shape_mask(label, *, center_yx, diameter, angle, hole_ratio, grid_yx):
  """Boolean mask of one shape over a grid of pixel centres.

  Args:
    label: int in [0, 6): the shape class (circle, square, triangle, star, ring, cross).
    center_yx: (float, float) centre in pixels.
    diameter: float. Diameter of the shape's circumscribed circle, in pixels.
    angle: float. Rotation in radians (ignored by circle and ring).
    hole_ratio: float in (0, 1). Inner / outer radius of a ring (ignored by the other shapes).
    grid_yx: ([h, 1] float, [1, w] float) pixel-centre coordinates, e.g. `row + 0.5`.

  Returns:
    [h, w] bool mask.
  """
  if not 0 <= int(label) < NUM_SHAPE_CLASSES:
    raise ValueError(f"label must be in [0, {NUM_SHAPE_CLASSES}), got {label!r}.")
  radius = 0.5 * float(diameter)
  dy, dx = grid_yx[0] - center_yx[0], grid_yx[1] - center_yx[1]  # [h, 1], [1, w]
  cos, sin = np.cos(angle), np.sin(angle)
  u, v = dx * cos + dy * sin, dy * cos - dx * sin  # [h, w] rotated coordinates
  if label == _CIRCLE:
    return np.hypot(dx, dy) <= radius
  if label == _RING:
    dist = np.hypot(dx, dy)
    return (dist <= radius) & (dist >= hole_ratio * radius)
  if label == _SQUARE:
    return _regular_polygon(u, v, radius, 4)
  if label == _TRIANGLE:
    return _regular_polygon(u, v, radius, 3)
  if label == _STAR:
    return _star(u, v, radius)
  arm = radius / np.sqrt(1.0 + 0.3**2)  # Cross: arm half-length, so its corners touch the circle.
  width = 0.3 * arm
  au, av = np.abs(u), np.abs(v)
  return ((au <= arm) & (av <= width)) | ((av <= arm) & (au <= width))


def _background(rng, size):
  """[size, size, 3] float32 in about 0..255: a two-colour gradient, soft blobs and optional stripes."""
  coords = (np.arange(size, dtype=np.float32) + 0.5) / size  # [S] pixel centres in (0, 1)
  yy, xx = coords[:, None, None], coords[None, :, None]  # [S, 1, 1], [1, S, 1]
  theta = rng.uniform(0.0, 2.0 * np.pi)
  ramp = np.float32(np.cos(theta)) * xx + np.float32(np.sin(theta)) * yy  # [S, S, 1]
  ramp = (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1e-6)  # [S, S, 1] in [0, 1]
  start, end = rng.uniform(0.0, 255.0, size=(2, 3)).astype(np.float32)
  image = start + (end - start) * ramp  # [S, S, 3]
  for _ in range(rng.integers(0, 5)):
    cy, cx, sigma, alpha = (float(v) for v in rng.uniform((0.0, 0.0, 0.05, 0.2), (1.0, 1.0, 0.25, 0.6)))
    colour = rng.uniform(0.0, 255.0, size=3).astype(np.float32)
    scale = np.float32(-0.5 / sigma**2)
    weight = alpha * np.exp(scale * (yy - cy)**2) * np.exp(scale * (xx - cx)**2)  # [S, S, 1], separable
    image = image + (colour - image) * weight
  if rng.uniform() < 0.5:
    phi = rng.uniform(0.0, np.pi)
    period = rng.uniform(6.0, 24.0) / 128.0
    amplitude = rng.uniform(8.0, 25.0)
    tint = (amplitude * rng.uniform(-1.0, 1.0, size=3)).astype(np.float32)
    phase = np.float32(np.cos(phi) / period) * xx + np.float32(np.sin(phi) / period) * yy  # [S, S, 1]
    image = image + tint * np.sign(np.sin(np.float32(2.0 * np.pi) * phase))
  return image.astype(np.float32)


def _pick_colour(rng, references):
  """An RGB colour far from every colour in `references` ([n, 3] float32): the best of a few random tries."""
  best, best_distance = None, -1.0
  for _ in range(32):
    colour = rng.uniform(0.0, 255.0, size=3).astype(np.float32)
    distance = float(np.linalg.norm(references - colour, axis=-1).min())
    if distance > best_distance:
      best, best_distance = colour, distance
    if distance >= MIN_CONTRAST:
      break
  return best


def _local_colours(crop, crop_ids):
  """[n, 3] float32 mean colour of each region (background, objects) inside a crop around the new object."""
  present = np.unique(crop_ids)
  return np.stack([crop[crop_ids == k].mean(axis=0) for k in present]).astype(np.float32)


def render_example(seed, *, size=128, scene=Scene()):
  """Renders one example.

  Args:
    seed: anything `numpy.random.default_rng` accepts (an int or a sequence of ints); the same seed, size and scene
      give the same bytes.
    size: int >= 32. Height and width of the square image in pixels.
    scene: `Scene`, the number and size of the shapes. Defaults to 1-8 shapes of 8-64 pixels (at 128).

  Returns:
    A dict of numpy arrays, N = number of objects in [1, scene.max_objects], in drawing order (back to front):
      image: [size, size, 3] uint8 RGB.
      mask: [size, size] uint8, 0 for background and label + 1 on each object's visible pixels.
      instances: [size, size] uint8, 0 for background and k + 1 on the visible pixels of object k.
      boxes: [N, 4] float32 yxyx normalised to [0, 1]: the visible extent of each object's pixels (pixel edges).
      labels: [N] int64 in [0, 6).
      visible_fraction: [N] float32, visible / drawn pixels of each object, >= MIN_VISIBLE_FRACTION.
  """
  if not isinstance(size, (int, np.integer)) or size < 32:
    raise ValueError(f"size must be an int >= 32, got {size!r}.")
  size = int(size)
  rng = np.random.default_rng(seed)
  scale = size / 128.0
  image = _background(rng, size)
  instances = np.zeros((size, size), np.uint8)
  visible = np.zeros(scene.max_objects + 1, np.int64)  # Visible pixels per instance id (0 = background).
  drawn, labels = [], []  # Drawn (unoccluded) area and label per placed object.
  for _ in range(rng.integers(scene.min_objects, scene.max_objects + 1)):
    label = int(rng.integers(NUM_SHAPE_CLASSES))
    for _ in range(MAX_PLACEMENT_TRIES):
      diameter = rng.uniform(scene.min_size, scene.max_size) * scale
      radius = 0.5 * diameter
      cy, cx = rng.uniform(radius, size - radius, size=2)
      angle, hole_ratio = rng.uniform(0.0, 2.0 * np.pi), rng.uniform(0.45, 0.65)
      y0, x0 = max(int(np.floor(cy - radius)) - 1, 0), max(int(np.floor(cx - radius)) - 1, 0)
      y1, x1 = min(int(np.ceil(cy + radius)) + 2, size), min(int(np.ceil(cx + radius)) + 2, size)
      grid = (np.arange(y0, y1)[:, None] + 0.5, np.arange(x0, x1)[None, :] + 0.5)
      mask = shape_mask(label, center_yx=(cy, cx), diameter=diameter, angle=angle, hole_ratio=hole_ratio,
                        grid_yx=grid)  # [y1 - y0, x1 - x0]
      area = int(mask.sum())
      if area < MIN_AREA * scale * scale:
        continue
      crop_ids = instances[y0:y1, x0:x1]
      lost = np.bincount(crop_ids[mask], minlength=scene.max_objects + 1)
      remaining = (visible - lost)[1:len(drawn) + 1]
      if np.any(remaining < MIN_VISIBLE_FRACTION * np.asarray(drawn, np.float64)):
        continue
      crop = image[y0:y1, x0:x1]
      colour = _pick_colour(rng, _local_colours(crop, crop_ids))
      shading = 1.0 + rng.uniform(-0.15, 0.15) * (np.arange(y0, y1) - cy)[:, None, None] / radius  # [h, 1, 1]
      fill = np.broadcast_to(colour * shading, crop.shape)
      crop[mask] = fill[mask]
      visible -= lost
      drawn.append(area)
      labels.append(label)
      visible[len(drawn)] = area
      crop_ids[mask] = len(drawn)
      break
  image += rng.normal(0.0, rng.uniform(2.0, 8.0), size=image.shape).astype(np.float32)
  image = np.clip(np.round(image), 0, 255).astype(np.uint8)

  boxes = np.zeros((len(drawn), 4), np.float32)
  for k in range(len(drawn)):
    on = instances == k + 1
    rows, cols = np.flatnonzero(on.any(axis=1)), np.flatnonzero(on.any(axis=0))
    boxes[k] = (rows[0], cols[0], rows[-1] + 1, cols[-1] + 1)
  labels = np.asarray(labels, np.int64)
  lookup = np.concatenate([[0], labels + 1]).astype(np.uint8)  # Instance id -> label + 1.
  return {
      "image": image,
      "mask": lookup[instances],
      "instances": instances,
      "boxes": boxes / np.float32(size),
      "labels": labels,
      "visible_fraction": (visible[1:len(drawn) + 1] / np.maximum(drawn, 1)).astype(np.float32),
  }
