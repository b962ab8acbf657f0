"""The install variants: which TensorFlow each extra resolves to (pip's dry-run report, metadata only: nothing is
downloaded beyond package metadata), and the message of a tfreward without TensorFlow."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def _resolve(extra, tmp_path):
  report = tmp_path / f"{extra}.json"
  proc = subprocess.run(
      [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
       "--report", str(report), f"{ROOT}[{extra}]"], capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  installs = json.loads(report.read_text())["install"]
  return {item["metadata"]["name"].lower().replace("_", "-"): item["metadata"]["version"] for item in installs}


@pytest.mark.slow  # about 20 s per variant: pip resolves against the package index
@pytest.mark.parametrize("extra, wanted, unwanted", [
    ("tpu", ("tensorflow-tpu", "libtpu"), ("tensorflow",)),
    ("cpu", ("tensorflow",), ("tensorflow-tpu", "libtpu")),
])
def test_each_extra_resolves_its_own_tensorflow(extra, wanted, unwanted, tmp_path):
  """On a TPU runtime, `pip install tfreward[tpu]` must not pull the CPU `tensorflow` over `tensorflow-tpu`: both
  write the `tensorflow` package, and tensorflow-tpu does not declare that it provides `tensorflow`."""
  resolved = _resolve(extra, tmp_path)
  assert all(name in resolved for name in wanted), resolved
  assert not any(name in resolved for name in unwanted), resolved
  assert resolved["keras"].startswith("3.") and "tensorflow-datasets" in resolved


def test_without_tensorflow_the_import_says_which_extra_to_install():
  # -S: no site-packages, so TensorFlow cannot be found; the repository is put on the path by hand.
  proc = subprocess.run([sys.executable, "-S", "-c", f"import sys; sys.path.insert(0, {ROOT!r}); import tfreward"],
                        capture_output=True, text=True, timeout=60, check=False)
  assert proc.returncode == 1
  assert "tfreward needs TensorFlow" in proc.stderr and "tfreward[tpu]" in proc.stderr
