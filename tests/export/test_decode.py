"""tfreward.export.decode: image sizes read from the headers of every supported format, and decoding refused before
it starts when they are out of bounds."""

import io
import struct
import time

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageSequence

from tfreward.export import decode

IMAGE = np.zeros([40, 60, 3], np.uint8)
IMAGE[10:30, 5:25] = 255
FRAME_2 = IMAGE.copy()
FRAME_2[0:8, 40:52] = 255


def pil_bytes(fmt, frames=(IMAGE,), **kwargs):
  out = io.BytesIO()
  images = [Image.fromarray(frame) for frame in frames]
  images[0].save(out, fmt, save_all=len(images) > 1, append_images=images[1:], **kwargs)
  return out.getvalue()


def header(data):
  fmt, hw, pixels = decode.header_size(tf.constant(data))
  return decode.FORMATS[int(fmt)] if fmt < decode.UNKNOWN else None, hw.numpy().tolist(), int(pixels)


def gif_with_frames(screen_hw, frame_hws):
  """A GIF89a with a 2-colour global table, a comment extension and one 1-byte LZW sub-block per frame of the given
  descriptor sizes (the sizes are all that matters to its header; giflib would fail on the pixel data)."""
  out = b"GIF89a" + struct.pack("<HHBBB", screen_hw[1], screen_hw[0], 0x80, 0, 0) + bytes(6)
  out += b"\x21\xfe\x03abc\x00"  # comment extension: one sub-block
  for height, width in frame_hws:
    out += b"\x2c" + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x02\x01\x44\x00"
  return out + b"\x3b"


@pytest.mark.parametrize("fmt, kwargs", [("JPEG", {"quality": 95}), ("PNG", {}), ("GIF", {}), ("BMP", {}),
                                         ("WEBP", {"lossless": True}), ("WEBP", {"quality": 90}),
                                         ("WEBP", {"lossless": True, "exif": b"Exif\0\0tfreward"})])
def test_every_format_sized_from_its_header_and_decoded(fmt, kwargs):
  data = pil_bytes(fmt, **kwargs)
  assert header(data) == ({"WEBP": "WebP"}.get(fmt, fmt), [40, 60], 2400)
  image = decode.decode_bounded(tf.constant(data), 60).numpy()
  assert image.shape == (40, 60, 3)
  lossy = fmt == "JPEG" or (fmt == "WEBP" and not kwargs.get("lossless"))
  np.testing.assert_allclose(image.astype(int), IMAGE, atol=40 if lossy else 0)
  with pytest.raises(tf.errors.InvalidArgumentError, match="outside"):
    decode.decode_bounded(tf.constant(data), 59)


def test_headers_of_other_shapes():
  bmp = bytearray(pil_bytes("BMP"))
  bmp[22:26] = struct.pack("<i", -40)  # top-down rows
  assert header(bytes(bmp))[1] == [40, 60]
  assert header(pil_bytes("WEBP", (IMAGE, FRAME_2), lossless=True))[1:] == ([0, 0], 0)  # animated WebP: refused
  png = bytearray(pil_bytes("PNG"))
  png[12:16] = b"IHDX"  # IHDR must come first
  assert header(bytes(png))[1:] == ([0, 0], 0)
  for data in (b"", b"garbage", b"\xff\x0a\x00\x00", b"BMP?"[:1], b"\x89PNG\r\n\x1a"):
    assert header(data)[0] is None, data  # empty, unknown, JPEG XL, too short for a magic
  with pytest.raises(tf.errors.InvalidArgumentError):
    header(b"\xff\xd8\xff\xe0 not a JPEG frame header")


def test_gif_counts_every_frame():
  animated = pil_bytes("GIF", (IMAGE, FRAME_2), loop=0, duration=100)
  frames = [frame.tile[0][1] for frame in ImageSequence.Iterator(Image.open(io.BytesIO(animated)))]
  assert len(frames) == 2
  assert header(animated) == ("GIF", [40, 60], sum((x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in frames))
  assert decode.decode_bounded(tf.constant(animated), 60).shape == (40, 60, 3)  # the first frame
  # A frame far larger than the logical screen: giflib would allocate its 9e6 palette indices.
  crafted = gif_with_frames((10, 10), [(10, 10), (3000, 3000)])
  assert header(crafted) == ("GIF", [10, 10], 100 + 3000 * 3000)
  with pytest.raises(tf.errors.InvalidArgumentError, match="outside"):
    decode.decode_bounded(tf.constant(crafted), 200)
  assert header(crafted[:40]) == ("GIF", [10, 10], 100)  # truncated: the walk stops where the data does


def test_png_bomb_refused_before_decoding(huge_png):
  assert header(huge_png) == ("PNG", [20000, 20000], 20000 * 20000)
  start = time.perf_counter()
  with pytest.raises(tf.errors.InvalidArgumentError, match="outside"):
    decode.decode_bounded(tf.constant(huge_png), decode.DEFAULT_MAX_DECODED_SIDE)
  assert time.perf_counter() - start < 1.0  # decoding it takes about 2 s and 1.2 GB


def half(data):
  return data[:len(data) // 2]


@pytest.mark.parametrize("data", [b"", b"\x89PNG garbage", half(pil_bytes("PNG")), pil_bytes("JPEG")[:-2],
                                  half(pil_bytes("GIF")), half(pil_bytes("BMP")), half(pil_bytes("WEBP"))],
                         ids=["empty", "garbage", "png", "jpeg_without_eoi", "gif", "bmp", "webp"])
def test_corrupt_and_truncated_images_fail(data):
  with pytest.raises(tf.errors.InvalidArgumentError):
    decode.decode_bounded(tf.constant(data), 100)
