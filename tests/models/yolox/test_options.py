"""Tests for tfreward.models.yolox.options: defaults, the YAML keys of the configs, checks naming the key."""

import os

import pytest

from tfreward import config, registry
from tfreward.config import ConfigError
from tfreward.models.yolox import YoloxOptions
from tfreward.models.yolox.options import SIZES


def test_defaults_are_the_single_spelling():
  options = YoloxOptions()
  assert options.size == "s" and options.ema and options.ema_decay == 0.9998 and options.iou_weight == 5.0
  assert options.depth_multiplier is None and options.width_multiplier is None and options.depthwise is None
  assert set(SIZES) == {"nano", "tiny", "s", "m", "l", "x"}


@pytest.mark.parametrize("path", ["shapes/yolox_nano.yaml", "coco/yolox_s.yaml"])
def test_committed_configs_keep_their_recipe(path):
  model = config.load_config(os.path.join(os.path.dirname(__file__), "../../../configs", path)).model
  options = registry.parse_options(model.family, model.options)
  assert isinstance(options, YoloxOptions) and options.ema and options.l1_last_epochs > 0


@pytest.mark.parametrize("values, match", [
    ({"size": "huge"}, "model.size.*huge"),
    ({"anchors": 3}, "anchors"),
    ({"width_multiplier": 0.0}, "model.width_multiplier"),
    ({"depth_multiplier": -1.0}, "model.depth_multiplier"),
    ({"iou_type": "ciou"}, "model.iou_type.*ciou"),
    ({"assigner": "ot"}, "model.assigner.*ot"),
    ({"iou_weight": -1.0}, "model.iou_weight"),
    ({"l1_last_epochs": -1}, "model.l1_last_epochs"),
    ({"max_detections": 0}, "model.max_detections"),
])
def test_bad_options_name_the_key(values, match):
  with pytest.raises(ConfigError, match=match):
    registry.parse_options("yolox", values)
