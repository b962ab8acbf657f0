"""GroupDetrOptions: defaults (Conditional DETR R50, 11 groups), checks, the registry and the YAML configs."""

import pathlib

import pytest

from tfreward import config as config_lib
from tfreward import registry
from tfreward.errors import ConfigError
from tfreward.models.group_detr import GroupDetr, GroupDetrOptions

CONFIGS = pathlib.Path(__file__).resolve().parents[3] / "configs"


def test_defaults_and_registry():
  family = registry.get_family("group_detr")
  assert family.task == "detection" and family.model_cls is GroupDetr and family.options_cls is GroupDetrOptions
  defaults = GroupDetrOptions()
  assert (defaults.backbone, defaults.hidden_dim, defaults.encoder_layers, defaults.decoder_layers) == (
      "resnet50", 256, 6, 6)
  assert (defaults.num_queries, defaults.num_groups, defaults.aux_loss) == (300, 11, True)
  assert (defaults.cls_loss_weight, defaults.bbox_loss_weight, defaults.giou_loss_weight) == (2.0, 5.0, 2.0)
  assert defaults.backbone_lr_multiplier == 0.1


@pytest.mark.parametrize("bad,pattern", [
    ({"backbone": "vgg"}, "vgg"), ({"num_groups": 0}, "num_groups"), ({"encoder_layers": -1}, "encoder_layers"),
    ({"hidden_dim": 20, "num_heads": 8}, "hidden_dim"), ({"queries": 3}, "queries"),
    ({"backbone": "small_cnn", "backbone_weights": "imagenet"}, "imagenet"), ({"dropout": 1.0}, "dropout"),
    ({"backbone_lr_multiplier": -0.1}, "backbone_lr_multiplier"), ({"giou_loss_weight": -1.0}, "giou_loss_weight"),
    ({"focal_alpha": 1.5}, "focal_alpha"),
])
def test_bad_options_are_config_errors(bad, pattern):
  with pytest.raises(ConfigError, match=pattern):
    registry.parse_options("group_detr", bad)


def test_yaml_configs():
  shapes = config_lib.load_config(str(CONFIGS / "shapes" / "group_detr.yaml"))
  options = registry.parse_options("group_detr", shapes.model.options)
  assert options.backbone == "small_cnn" and shapes.data.max_instances <= options.num_queries
  coco = config_lib.load_config(str(CONFIGS / "coco" / "group_detr_r50.yaml"))
  options = registry.parse_options("group_detr", coco.model.options)
  opt = coco.train.optimizer
  assert (options.backbone, options.num_queries, options.num_groups) == ("resnet50", 300, 11)
  assert opt.learning_rate * options.backbone_lr_multiplier == pytest.approx(1e-5)
  assert (opt.name, opt.learning_rate, opt.weight_decay, opt.clip_norm) == ("adamw", 1e-4, 1e-4, 0.1)
  assert coco.data.global_batch_size == 16 and coco.train.epochs == 12
  assert opt.schedule == "step" and opt.decay_steps == [11 * coco.train.steps_per_epoch]
  assert coco.data.max_instances <= options.num_queries
