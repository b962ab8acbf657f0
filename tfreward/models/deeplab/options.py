"""`model:` keys of the deeplab family: one dataclass, its defaults and checks."""

import dataclasses
from typing import Optional

from tfreward.errors import ConfigError
from tfreward.models import backbones
from tfreward.models import options as checks

BACKBONES = backbones.RESNETS  # config name -> `tfreward.models.backbones.ResNet` size
OUTPUT_STRIDES = (16, 8)
MODES = ("ce", "reward")
ESTIMATORS = ("reinforce", "weighted_ce")
CLASS_WEIGHTS = ("none", "frequency")


@dataclasses.dataclass
class DeepLabOptions:
  """`model:` keys of the deeplab family (DeepLabv3).

  backbone: "resnet10", "resnet18" (basic blocks, light stem, for CPU-sized data) or "resnet50" (keras.applications).
  backbone_width: resnet10 / resnet18: channels of the stem and first stage (doubled per stage).
  backbone_weights: resnet50 only: null or "imagenet".
  output_stride: 16 (C5 dilated by 2) or 8 (C4 and C5 dilated by 2 and 4).
  aspp_channels: channels of every ASPP branch, of its projection and of the head's 3x3 conv.
  aspp_rates: atrous rates of the 3x3 ASPP branches at output stride 16; doubled at output stride 8.
  aux_head: an FCN head on C4 trained with weight `aux_weight` (term loss_aux); not used by `segment`.
  dropout: dropout after the ASPP projection (and before the aux head's classifier).
  sync_bn: batch statistics over all replicas (backbone, ASPP and heads).
  class_weights: "none" or "frequency": the seed's per-class weights of the cross-entropy (every CE term, both
    modes), w_c = 1 / (f_c + class_weight_smooth) with f_c class c's share of the labelled training pixels,
    normalised to sum to the number of classes; the trainer counts the pixels once per dataset and caches them.
  class_weight_smooth: the smoothing of those weights (larger: flatter).
  mode: "ce" (cross-entropy training) or "reward" (tuning with the per-image mIoU reward, `estimator`).
  estimator: reward mode: "reinforce" (the paper's: `num_samples` label maps sampled per image from the per-pixel
    softmax at `temperature`, each rewarded by its mIoU against the leave-one-out mean of the image's other samples)
    or "weighted_ce" (the seed's: each image's cross-entropy weighted by r = R - baseline_weight x the mean R of the
    global batch's other images, R = 1 - mIoU of the greedy prediction).
  num_samples: reinforce: label maps sampled per image (>= 2: the baseline is the mean of the others).
  temperature: reinforce: softmax temperature of the samples (the log-probability is the model's, temperature 1).
  ce_weight: reinforce: weight of the cross-entropy on the ground truth added as an anchor (0: none).
  baseline_weight: weighted_ce: the weight of the other images' mean R in r (the seed's 0.1).
  seed: the step's sampling seed (folded with the optimizer step and each image's index in the global batch).
  """
  backbone: str = "resnet50"
  backbone_width: int = 64
  backbone_weights: Optional[str] = None
  output_stride: int = 16
  aspp_channels: int = 256
  aspp_rates: tuple[int, ...] = (6, 12, 18)
  aux_head: bool = False
  aux_weight: float = 0.4
  dropout: float = 0.1
  sync_bn: bool = True
  class_weights: str = "none"
  class_weight_smooth: float = 0.05
  mode: str = "ce"
  estimator: str = "reinforce"
  num_samples: int = 4
  temperature: float = 1.0
  ce_weight: float = 0.0
  baseline_weight: float = 0.1
  seed: int = 0

  def __post_init__(self):
    checks.check_choice("backbone", self.backbone, tuple(BACKBONES))
    checks.check_backbone_weights(self.backbone_weights, self.backbone)
    checks.check_choice("output_stride", self.output_stride, OUTPUT_STRIDES)
    checks.check_at_least(self, ("backbone_width", "aspp_channels"))
    if not self.aspp_rates or any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in self.aspp_rates):
      raise ConfigError(f"model.aspp_rates must be a non-empty list of positive ints, got {self.aspp_rates!r}.")
    checks.check_number("aux_weight", self.aux_weight, 0)
    checks.check_number("dropout", self.dropout, 0)
    if self.dropout >= 1:
      raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout!r}.")
    checks.check_choice("class_weights", self.class_weights, CLASS_WEIGHTS)
    checks.check_choice("mode", self.mode, MODES)
    checks.check_choice("estimator", self.estimator, ESTIMATORS)
    for name in ("class_weight_smooth", "temperature"):
      checks.check_number(name, getattr(self, name), 0)
      if getattr(self, name) == 0:
        raise ConfigError(f"model.{name} must be > 0, got 0.")
    checks.check_number("ce_weight", self.ce_weight, 0)
    checks.check_number("baseline_weight", self.baseline_weight, 0)
    checks.check_at_least(self, ("num_samples",))
    if self.mode == "reward" and self.estimator == "reinforce" and self.num_samples < 2:
      raise ConfigError(f"model.num_samples must be >= 2 with estimator 'reinforce' (each sample's baseline is the "
                        f"mean reward of the image's other samples), got {self.num_samples}.")
    checks.check_at_least(self, ("seed",), minimum=0)

  @property
  def rates(self):
    """The atrous rates at `output_stride`: `aspp_rates`, doubled at output stride 8."""
    return tuple(r * 16 // self.output_stride for r in self.aspp_rates)
