"""Working memory of compiled XLA programs, read off the buffer assignments XLA dumps (`--xla_dump_to`)."""

import glob
import os
import re


def xla_temp_bytes(dump_dir):
  """Largest preallocated temp buffer among the XLA programs dumped to `dump_dir` (their exact working memory)."""
  sizes = [0]
  for name in glob.glob(os.path.join(dump_dir, "*buffer-assignment.txt")):
    with open(name) as f:
      sizes += [int(m) for m in re.findall(r"allocation \d+: size (\d+), preallocated-temp", f.read())]
  return max(sizes)
