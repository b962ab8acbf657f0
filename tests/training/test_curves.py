"""Tests for tfreward.training.curves and `tfreward curves`: scalars read back from TensorBoard logs as written, the
side-by-side table over training steps, the PNG, resumed runs and clear errors."""

import numpy as np
import pytest
import tensorflow as tf
import yaml
from PIL import Image

from tfreward import cli
from tfreward.errors import UserError
from tfreward.training import curves


def _run(path, steps_per_epoch, values, *, writes=1):
  """A run directory like `tfreward train` leaves: config.yaml and epoch_* validation scalars (epoch -> value)."""
  path.mkdir()
  (path / "config.yaml").write_text(yaml.safe_dump({"train": {"steps_per_epoch": steps_per_epoch}}))
  for _ in range(writes):  # a resumed run writes a second events file
    with tf.summary.create_file_writer(str(path / "logs" / "validation")).as_default():
      for epoch, (m, m50) in values.items():
        tf.summary.scalar("epoch_mAP", m, step=epoch)
        tf.summary.scalar("epoch_mAP50", m50, step=epoch)
  return str(path)


def test_scalars_table_and_plot(tmp_path):
  a = _run(tmp_path / "a", 100, {1: (0.1, 0.2), 3: (0.3, 0.5)}, writes=2)
  b = _run(tmp_path / "b", 50, {3: (0.05, 0.125)})
  scalars = curves.read_scalars(a)
  assert set(scalars) == {"mAP", "mAP50"}
  np.testing.assert_allclose(np.array(scalars["mAP50"]), [[1, 0.2], [3, 0.5]], rtol=1e-6)
  table = curves.compare_runs([a, b], labels=["groups 11", "groups 1"], out=str(tmp_path / "plot.png"))
  lines = table.splitlines()
  assert lines[0] == "| step | mAP groups 11 | mAP groups 1 | mAP50 groups 11 | mAP50 groups 1 |"
  # Run a: epochs 1 and 3 at 100 steps each; run b: epoch 3 at 50 steps, so both have step 200.
  assert lines[2:] == ["| 200 | 0.100 | 0.050 | 0.200 | 0.125 |", "| 400 | 0.300 |  | 0.500 |  |"]
  assert Image.open(tmp_path / "plot.png").size[0] > 500


def test_runs_sharing_a_label_are_averaged_with_their_range(tmp_path):
  seeds = [_run(tmp_path / f"a{i}", 100, {0: (0.1 + 0.1 * i, 0.5), 1: (0.2, 0.6)}) for i in range(3)]
  other = _run(tmp_path / "b", 100, {1: (0.25, 0.7)})
  table = curves.compare_runs(seeds + [other], labels=["a", "a", "a", "b"], metrics=("mAP",),
                              out=str(tmp_path / "plot.png"))
  assert table.splitlines() == ["| step | mAP a | mAP b |", "|---|---|---|",
                                "| 100 | 0.200 (0.100-0.300, 3 runs) |  |",
                                "| 200 | 0.200 (0.200-0.200, 3 runs) | 0.250 |"]
  assert Image.open(tmp_path / "plot.png").size[0] > 300


def test_cli_and_errors(tmp_path, capsys):
  a = _run(tmp_path / "a", 10, {0: (0.25, 0.5)})
  assert cli.main(["curves", a, "--metric", "mAP50", "--out", str(tmp_path / "c.png")]) == 0
  out = capsys.readouterr().out
  assert "| step | mAP50 a |" in out and "| 10 | 0.500 |" in out and (tmp_path / "c.png").exists()
  with pytest.raises(UserError, match="no TensorBoard logs"):
    curves.read_scalars(str(tmp_path))
  with pytest.raises(UserError, match="no validation metric 'mIoU'"):
    curves.compare_runs([a], metrics=("mIoU",))
  with pytest.raises(UserError, match="2 labels for 1 runs"):
    curves.compare_runs([a], labels=["x", "y"])
