"""Fixtures of the export tests: a small, valid PNG that decodes to a huge image."""

import struct
import zlib

import pytest


def png_chunk(kind, data):
  return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


@pytest.fixture(scope="session")
def huge_png():
  """A valid 1-bit grey PNG of 20000 x 20000 black pixels: about 50 KB that `tf.io.decode_image` turns into 1.2 GB of
  RGB (about 2 s); the serving signatures must refuse it from its IHDR."""
  side = 20000
  compressor = zlib.compressobj(9)
  row = b"\0" * (1 + side // 8)  # filter byte, then 1 bit a pixel
  pixels = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
  return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
          + png_chunk(b"IDAT", pixels) + png_chunk(b"IEND", b""))
