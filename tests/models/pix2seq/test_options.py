"""Tests for tfreward.models.pix2seq.options: checks, nested sampling options, registry, config round trip."""

import dataclasses

import pytest

from tfreward import registry
from tfreward.config import ConfigError, from_dict
from tfreward.models.pix2seq import Pix2Seq, Pix2SeqOptions, SamplingOptions


@pytest.mark.parametrize("bad", [
    dict(mode="ppo"), dict(num_samples=1), dict(dim=30, num_heads=4), dict(cls_counts="imagenet"),
    dict(order="area"), dict(filler="zeros"), dict(encoder="vit"), dict(reinforce_samples="best"),
    dict(reinforce_samples="deviations"), dict(credit="box"), dict(credit="token"), dict(box_attention="yes"),
    dict(reinforce_conf=1), dict(mle_weight=-1.0), dict(mle_weight=True), dict(mle_weight=float("inf")),
    dict(conf_weight=-0.1), dict(samples=SamplingOptions(greedy=True)), dict(detect={"greedy": True})])
def test_bad_options_raise(bad):
  with pytest.raises(ConfigError):
    Pix2SeqOptions(**bad)


@pytest.mark.parametrize("bad", [dict(temperature=0.0), dict(temperature=True), dict(top_k=-1), dict(top_k=1.5),
                                 dict(top_p=0.0), dict(top_p=1.5), dict(greedy="no")])
def test_bad_sampling_options_raise(bad):
  with pytest.raises(ConfigError, match=next(iter(bad))):
    SamplingOptions(**bad)


@pytest.mark.parametrize("retired", ["decode", "temperature", "sample_temperature", "sample_top_k", "sample_top_p",
                                     "baseline", "advantage_floor", "freeze_encoder", "conf_detach",
                                     "reinforce_padding", "mle_tokens"])
def test_retired_keys_are_unknown(retired):
  with pytest.raises(ConfigError, match="unknown config key"):
    registry.parse_options("pix2seq", {retired: 1})


def test_sampling_defaults_and_nested_mappings():
  options = Pix2SeqOptions()
  assert options.detect == SamplingOptions(greedy=True) and options.samples == SamplingOptions(greedy=False)
  parsed = from_dict(Pix2SeqOptions, {"mode": "reward", "detect": {"greedy": False, "temperature": 0.8, "top_k": 5},
                                      "samples": {"temperature": 0.6}}, "model")
  assert parsed.detect == SamplingOptions(greedy=False, temperature=0.8, top_k=5)
  assert parsed.samples == SamplingOptions(temperature=0.6)
  assert from_dict(Pix2SeqOptions, dataclasses.asdict(parsed), "model") == parsed
  with pytest.raises(ConfigError, match="model.samples.greedy"):
    from_dict(Pix2SeqOptions, {"samples": {"greedy": True}}, "model")
  with pytest.raises(ConfigError, match="unknown config key 'model.detect.beam'"):
    from_dict(Pix2SeqOptions, {"detect": {"beam": 4}}, "model")


def test_registered_family_builds_and_checks_class_counts():
  options = registry.parse_options("pix2seq", {"mode": "reward", "num_boxes": 5, "cls_counts": [1, 2, 3]})
  family = registry.get_family("pix2seq")
  assert family.task == "detection" and family.model_cls is Pix2Seq and family.options_cls is Pix2SeqOptions
  model = family.model_cls(options, num_classes=3, image_size=(32, 32))
  assert model.seq_len == 30 and model.reward_config["cls_counts"] == (1, 2, 3)
  with pytest.raises(ValueError, match="cls_counts"):
    Pix2Seq(options, num_classes=4, image_size=(32, 32))
