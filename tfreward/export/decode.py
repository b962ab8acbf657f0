"""Bounded decoding of one encoded image for the serving signatures, in TensorFlow ops only.

`decode_bounded(encoded, max_side)` reads the image's size from its header, and fails with InvalidArgumentError
BEFORE decoding anything when the bytes are none of the supported formats or a side is outside [1, max_side]:

  JPEG  the frame header, with `tf.image.extract_jpeg_shape`;
  PNG   the IHDR chunk (it must come first, as libpng requires);
  GIF   the logical screen, and every frame's image descriptor: giflib keeps every frame's palette indices (1 byte
        a pixel, each frame as large as its descriptor says), so all frames together may hold at most max_side**2
        pixels;
  BMP   the info header (width and |height|, int32 at bytes 18 and 22);
  WebP  the VP8 / VP8L / VP8X header (still images; an animated WebP is refused).

Anything else (JPEG XL, which `tf.io.decode_image` also reads, included) is refused. Only then is the image decoded
by `tf.io.decode_image` (first frame, 3 channels, uint8), which fails on data that is truncated or corrupt.
"""

import tensorflow as tf

FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WebP")
UNKNOWN = len(FORMATS)  # the format index of bytes that are none of FORMATS
DEFAULT_MAX_DECODED_SIDE = 8192  # px on the long side: at most 192 MiB of decoded RGB
_HEAD = 32  # header bytes read for every format but GIF (whose frames are walked through the whole file)


def _head(encoded):
  """The first _HEAD bytes of `encoded` (a scalar string), zero-padded: (string [], int64 [_HEAD] byte values)."""
  head = tf.strings.substr(tf.strings.join([tf.strings.substr(encoded, 0, _HEAD), "\0" * _HEAD]), 0, _HEAD)
  return head, tf.cast(tf.io.decode_raw(head, tf.uint8), tf.int64)


def _starts(head, offset, magic):
  return tf.equal(tf.strings.substr(head, offset, len(magic)), magic)


def _uint(values, offset, size, big_endian=False):
  """The unsigned int of `size` bytes of the int64 byte values at `offset`, little-endian unless `big_endian`."""
  weights = [256 ** (size - 1 - i if big_endian else i) for i in range(size)]
  return sum(values[offset + i] * weights[i] for i in range(size))


def _format(head):
  """The index in FORMATS of the format whose magic bytes start `head` (those `tf.io.decode_image` reads), UNKNOWN if
  none do. int32 []."""
  found = tf.stack([_starts(head, 0, b"\xff\xd8\xff"), _starts(head, 0, b"\x89PNG\r\n\x1a\n"),
                    _starts(head, 0, b"GIF8"), _starts(head, 0, b"BM"),
                    _starts(head, 0, b"RIFF") & _starts(head, 8, b"WEBP"), tf.constant(True)])
  return tf.argmax(tf.cast(found, tf.int32), output_type=tf.int32)


def _gif_frame_pixels(encoded, screen_flags):
  """Pixels of all frames of a GIF together (int64 []), walking its blocks as giflib's DGifSlurp does; the walk stops
  at the trailer, at an unknown block or at the end of the data (giflib fails on the last two)."""
  data = tf.concat([tf.cast(tf.io.decode_raw(encoded, tf.uint8), tf.int64), tf.zeros([1], tf.int64)], 0)
  last = tf.size(data, out_type=tf.int64) - 1

  def at(i):  # byte i, or 0 past the end
    return data[tf.minimum(i, last)]

  def colour_table(flags):  # bytes of the colour table that follows a block with these flags
    return tf.where(flags >= 128, 3 * tf.bitwise.left_shift(tf.constant(2, tf.int64), flags % 8), 0)

  def skip_sub_blocks(p):  # p at a sub-block's size byte -> just past the 0 terminator
    return tf.while_loop(lambda p: at(p) > 0, lambda p: [p + at(p) + 1], [p])[0] + 1

  def record(p, pixels):
    def extension():  # 0x21, label, sub-blocks
      return skip_sub_blocks(p + 2), pixels

    def image():  # 0x2C, left, top, width, height (uint16 LE), flags, colour table, LZW code size, sub-blocks
      area = (at(p + 5) + 256 * at(p + 6)) * (at(p + 7) + 256 * at(p + 8))
      return skip_sub_blocks(p + 11 + colour_table(at(p + 9))), pixels + area

    return tf.cond(tf.equal(at(p), 0x21), extension, image)

  start = 13 + colour_table(screen_flags)  # after the header, the logical screen descriptor and its colour table
  more = lambda p, pixels: tf.equal(at(p), 0x21) | tf.equal(at(p), 0x2C)
  return tf.while_loop(more, record, [start, tf.constant(0, tf.int64)])[1]


def header_size(encoded):
  """What the header of one encoded image says, without decoding it.

  Args:
    encoded: tf.string [] image bytes.
  Returns:
    format: int32 [], index in FORMATS or UNKNOWN.
    hw: int64 [2] height and width (0, 0 when the format is UNKNOWN or the header is not one of its kind).
    pixels: int64 [] pixels the decoder holds: height * width, for GIF every frame's area summed.
  Raises InvalidArgumentError (when run) on a JPEG whose frame header cannot be read.
  """
  head, values = _head(encoded)
  fmt = _format(head)
  zero = tf.zeros([2], tf.int64)

  def jpeg():
    return tf.cast(tf.image.extract_jpeg_shape(encoded)[:2], tf.int64)

  def png():
    hw = tf.stack([_uint(values, 20, 4, True), _uint(values, 16, 4, True)])
    return tf.where(_starts(head, 12, b"IHDR"), hw, zero)

  def gif():
    return tf.stack([_uint(values, 8, 2), _uint(values, 6, 2)])

  def bmp():
    signed = lambda v: tf.where(v >= 2 ** 31, v - 2 ** 32, v)
    return tf.stack([tf.abs(signed(_uint(values, 22, 4))), signed(_uint(values, 18, 4))])

  def webp():  # RIFF, size, WEBP, then the first chunk's fourcc at byte 12 and its data from byte 20
    lossy = tf.stack([_uint(values, 28, 2), _uint(values, 26, 2)]) % 16384  # 14 bits each (2 bits scale above)
    vp8l = _uint(values, 21, 4)  # after the 0x2F signature: 14 bits width - 1, 14 bits height - 1
    lossless = tf.stack([vp8l // 16384 % 16384, vp8l % 16384]) + 1
    extended = tf.stack([_uint(values, 27, 3), _uint(values, 24, 3)]) + 1  # the canvas, 24 bits each
    still = tf.equal(tf.bitwise.bitwise_and(values[20], 2), 0)  # VP8X flags: bit 1 is animation
    return tf.where(_starts(head, 12, b"VP8 "), lossy,
                    tf.where(_starts(head, 12, b"VP8L") & tf.equal(values[20], 0x2F), lossless,
                             tf.where(_starts(head, 12, b"VP8X") & still, extended, zero)))

  hw = tf.switch_case(fmt, [jpeg, png, gif, bmp, webp], default=lambda: zero)
  is_gif = tf.equal(fmt, FORMATS.index("GIF"))
  pixels = tf.cond(is_gif, lambda: _gif_frame_pixels(encoded, values[10]), lambda: hw[0] * hw[1])
  return fmt, hw, pixels


def decode_bounded(encoded, max_side):
  """One encoded image -> uint8 [h, w, 3] (first frame), or InvalidArgumentError (when run) if its header shows an
  unsupported format or a side outside [1, max_side] (checked before decoding), or if it does not decode.

  Args:
    encoded: tf.string [] image bytes.
    max_side: int. Largest accepted height or width, in pixels.
  """
  fmt, hw, pixels = header_size(encoded)
  accepted = ((fmt != UNKNOWN) & tf.reduce_all(hw >= 1) & tf.reduce_all(hw <= max_side)
              & (pixels <= int(max_side) ** 2))
  check = tf.debugging.Assert(accepted, ["unsupported image, or a side outside [1, max_side]; format, hw, pixels:",
                                         fmt, hw, pixels])
  with tf.control_dependencies([check]):
    return tf.io.decode_image(encoded, channels=3, dtype=tf.uint8, expand_animations=False)
