"""`model:` keys of the pix2seq family: `Pix2SeqOptions`, with `SamplingOptions` for each way it decodes."""

import dataclasses
from typing import Union

from tfreward.errors import ConfigError
from tfreward.models import options as checks
from tfreward.rewards import detection


def _check_bool(name, value):
  if not isinstance(value, bool):
    raise ConfigError(f"model.{name} must be true or false, got {value!r}.")


@dataclasses.dataclass
class SamplingOptions:
  """How a sequence is decoded (`tfreward.ops.sampling.sample_sequences`).

  greedy: the most likely allowed token at each position (the others are then ignored); else sampled:
  temperature: > 0, divides the logits.
  top_k: keep the k most likely tokens; 0 keeps all.
  top_p: in (0, 1], keep the smallest set of tokens reaching this probability (nucleus); 1 keeps all.
  """
  greedy: bool = False
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
    valid = {"greedy": (isinstance(self.greedy, bool), "true or false"),
             "temperature": (number(self.temperature) and self.temperature > 0, "a number > 0"),
             "top_k": (isinstance(self.top_k, int) and not isinstance(self.top_k, bool) and self.top_k >= 0,
                       "an int >= 0"),
             "top_p": (number(self.top_p) and 0 < self.top_p <= 1, "a number in (0, 1]")}
    for name, (ok, what) in valid.items():
      if not ok:
        raise ConfigError(f"sampling option {name} (model.detect.{name}, model.samples.{name}) must be {what}, "
                          f"got {getattr(self, name)!r}.")


@dataclasses.dataclass
class Pix2SeqOptions:
  """`model:` keys of the pix2seq family (see `tfreward.models.pix2seq.model`).

  mode: "mle" (teacher-forced pre-training) or "reward" (REINFORCE tuning; same weights).
  Tokens: max_level coordinate bins; max_conf conf tokens 0..max_conf; num_boxes slots (L = 6 * num_boxes).
  order: MLE object order, "random", "raster" (top-left corners, row by row) or "fixed" (dataset order).
  filler: MLE slots after the objects, "noise" (Pix2Seq's noise boxes, conf 0) or "empty" (`targets`).
  Encoder: encoder "cnn" or "resnet50"; encoder_width, encoder_stages (cnn: first-stage channels, stride
    2**stages); encoder_layers Transformer layers on the image tokens; box_attention: class and conf tokens attend
    inside their box (`decoder.SequenceDecoder`).
  Decoder: dim (a multiple of 4 and of num_heads), decoder_layers, num_heads, mlp_ratio.
  detect: `SamplingOptions` of `detect` (default greedy).
  Reward tuning: num_samples N >= 2 sequences per image, drawn with `samples` (`SamplingOptions`, not greedy);
    reinforce_samples: REINFORCE on sample 0 ("first", the seed's form) or on all N ("all"), each against the
    leave-one-out baseline; credit: every token gets its sequence's advantage ("sequence") or the tokens of box slot
    k the reward earned from slot k on minus its baseline ("slot", `reinforce.slot_returns`); reinforce_conf: conf
    tokens in the REINFORCE term; conf_weight: weight of the confidence loss; mle_weight: + this times the MLE loss
    on the ground truth (an anchor; 0: none).
  Reward (`tfreward.rewards.detection`): nms_w, cls_smooth, reward_thr, correct_thr, cls_counts ("uniform", "coco"
    or one count per class), legacy_threshold_keys.
  seed: salt of the in-step randomness (object order, noise boxes, samples).
  """
  mode: str = "mle"
  max_level: int = 1000
  max_conf: int = 2
  num_boxes: int = 100
  order: str = "random"
  filler: str = "noise"
  encoder: str = "cnn"
  encoder_width: int = 32
  encoder_stages: int = 3
  encoder_layers: int = 1
  box_attention: bool = True
  dim: int = 256
  decoder_layers: int = 4
  num_heads: int = 8
  mlp_ratio: int = 4
  detect: SamplingOptions = dataclasses.field(default_factory=lambda: SamplingOptions(greedy=True))
  num_samples: int = 8
  samples: SamplingOptions = dataclasses.field(default_factory=SamplingOptions)
  conf_weight: float = 0.3
  reinforce_conf: bool = True
  reinforce_samples: str = "first"
  credit: str = "sequence"
  mle_weight: float = 0.0
  nms_w: float = 0.3
  cls_smooth: float = 0.05
  reward_thr: tuple[float, ...] = detection.PAPER_REWARD_THR
  correct_thr: float = 0.5
  cls_counts: Union[str, list[int]] = "uniform"
  legacy_threshold_keys: bool = False
  seed: int = 0

  def __post_init__(self):
    choices = {"mode": ("mle", "reward"), "order": ("random", "raster", "fixed"), "filler": ("noise", "empty"),
               "encoder": ("cnn", "resnet50"), "reinforce_samples": ("first", "all"), "credit": ("sequence", "slot")}
    for name, valid in choices.items():
      checks.check_choice(name, getattr(self, name), valid)
    checks.check_at_least(self, ("max_level", "max_conf", "num_boxes", "encoder_width", "encoder_stages", "dim",
                                 "decoder_layers", "num_heads", "mlp_ratio"))
    checks.check_at_least(self, ("encoder_layers",), 0)
    checks.check_at_least(self, ("num_samples",), 2)  # the leave-one-out baseline needs another sample
    if self.dim % self.num_heads or self.dim % 4:
      raise ConfigError(f"model.dim must be a multiple of 4 and of model.num_heads, got {self.dim!r} and "
                        f"{self.num_heads!r}.")
    for name in ("conf_weight", "mle_weight"):
      checks.check_number(name, getattr(self, name), 0)
    for name in ("box_attention", "reinforce_conf", "legacy_threshold_keys"):
      _check_bool(name, getattr(self, name))
    for name in ("detect", "samples"):
      if not isinstance(getattr(self, name), SamplingOptions):
        raise ConfigError(f"model.{name} must be a mapping of sampling options, got {getattr(self, name)!r}.")
    if self.samples.greedy:
      raise ConfigError("model.samples.greedy must be false: the reward step needs N different samples per image.")
    if isinstance(self.cls_counts, str) and self.cls_counts not in ("uniform", "coco"):
      raise ConfigError(f"model.cls_counts must be 'uniform', 'coco' or a list of counts, got {self.cls_counts!r}.")
