"""Tests for tfreward.models.retinanet.options: defaults, checks, the registry entry and the YAML configs."""

import os

import pytest

from tfreward import registry
from tfreward.config import ConfigError, load_config
from tfreward.models.retinanet import RetinaNet, RetinaNetOptions

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "..", "configs")


def test_registry_and_defaults():
  family = registry.get_family("retinanet")
  assert family.model_cls is RetinaNet and family.options_cls is RetinaNetOptions and family.task == "detection"
  options = registry.parse_options("retinanet", {"loss": "retinanet", "backbone": "resnet18", "backbone_width": 8,
                                                 "aspect_ratios": [1.0, 2.0], "bbox_loss_weight": 2})
  assert options.aspect_ratios == (1.0, 2.0) and options.bbox_weight == 2.0
  defaults = RetinaNetOptions()
  assert (defaults.loss, defaults.backbone, defaults.backbone_width, defaults.bbox_weight) == (
      "free_anchor", "resnet10", 32, 0.75)
  assert RetinaNetOptions(loss="retinanet").bbox_weight == 1.0


@pytest.mark.parametrize("bad", [
    {"loss": "fcos"}, {"backbone": "vgg"}, {"backbone": "small_resnet"}, {"backbone_depth": 2},
    {"backbone_weights": "imagenet"}, {"backbone": "resnet50", "backbone_weights": "coco"}, {"head_convs": -1},
    {"frozen_stages": 5}, {"aspect_ratios": []}, {"octave_base_scale": 0.0}, {"pre_nms_top_k": 0},
    {"backbone_width": 0}, {"bbox_loss_weight": -1.0}])
def test_bad_options(bad):
  with pytest.raises(ConfigError):
    registry.parse_options("retinanet", bad)


def test_yaml_configs():
  fa = load_config(os.path.join(CONFIGS, "shapes", "freeanchor.yaml"))
  base = load_config(os.path.join(CONFIGS, "shapes", "retinanet.yaml"))
  assert fa.model.family == base.model.family == "retinanet"
  assert fa.model.options["loss"] == "free_anchor" and base.model.options["loss"] == "retinanet"
  assert fa.train == base.train and fa.data == base.data  # same budget
  shared = {k: v for k, v in fa.model.options.items() if k not in ("loss", "bbox_loss_weight")}
  assert all(base.model.options.get(k, v) == v for k, v in shared.items())
  for config in (fa, base):
    options = registry.parse_options("retinanet", config.model.options)
    assert (options.backbone, options.backbone_width) == ("resnet18", 32)
  coco = load_config(os.path.join(CONFIGS, "coco", "freeanchor_r50_1x.yaml"))
  options = registry.parse_options("retinanet", coco.model.options)
  assert (options.backbone, options.backbone_weights, options.frozen_bn, options.frozen_stages) == (
      "resnet50", "imagenet", True, 1)
  assert (options.smoothl1_beta, options.bbox_loss_weight, options.pre_anchor_topk) == (0.11, 0.75, 50)
  opt = coco.train.optimizer
  assert (opt.name, opt.learning_rate, opt.momentum, opt.weight_decay, opt.clip_norm, opt.warmup_steps) == (
      "sgd", 0.01, 0.9, 1e-4, 35.0, 500)
  steps_per_epoch = coco.train.steps_per_epoch
  assert coco.data.global_batch_size == 16 and coco.train.epochs == 12
  assert opt.schedule == "step" and opt.decay_steps == [8 * steps_per_epoch, 11 * steps_per_epoch]
  assert tuple(coco.data.image_size) == (1024, 1024)
