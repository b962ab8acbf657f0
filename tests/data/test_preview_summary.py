"""`tfreward data preview` prints the split's count of degenerate boxes (`statistics.degenerate_box_count`)."""

from tfreward.data import preview
from tfreward.data import statistics


def test_write_preview_prints_the_degenerate_box_count(shapes_test_data_dir, tmp_path, capsys):
  name = "tfreward_shapes/test"
  counts = statistics.degenerate_box_count(name, split="validation", data_dir=shapes_test_data_dir)
  preview.write_preview(tmp_path / "p.png", name=name, split="validation", data_dir=shapes_test_data_dir,
                        num_images=1, columns=1)
  printed = capsys.readouterr().out
  assert counts["examples"] == 10 and counts["boxes"] > 10
  assert f"{name} validation: 0 of {counts['boxes']} boxes in 10 examples have no positive extent" in printed
