import numpy as np
import pytest

from tfreward.config import OptimizerConfig
from tfreward.training.optimizers import WarmupSchedule, build_optimizer


def test_warmup_then_cosine():
  s = WarmupSchedule(1.0, total_steps=110, warmup_steps=10, kind="cosine", min_ratio=0.1)
  values = [float(s(i)) for i in (0, 4, 9, 10, 60, 110, 500)]
  np.testing.assert_allclose(values[:3], [0.1, 0.5, 1.0], rtol=1e-6)
  assert values[3] == pytest.approx(1.0)
  assert values[4] == pytest.approx(0.55, rel=1e-5)
  assert values[5] == pytest.approx(0.1) and values[6] == pytest.approx(0.1)


def test_step_and_constant():
  s = WarmupSchedule(0.01, total_steps=12, kind="step", boundaries=[8, 11], decay_rate=0.1)
  np.testing.assert_allclose([float(s(i)) for i in (0, 7, 8, 10, 11)], [0.01, 0.01, 0.001, 0.001, 0.0001],
                             rtol=1e-5)
  assert float(WarmupSchedule(0.5, total_steps=3, kind="constant")(2)) == pytest.approx(0.5)
  restored = WarmupSchedule(**s.get_config())
  assert float(restored(9)) == pytest.approx(float(s(9)))


def test_build_optimizers():
  adamw = build_optimizer(OptimizerConfig(name="adamw", learning_rate=1e-3), total_steps=10)
  sgd = build_optimizer(OptimizerConfig(name="sgd", learning_rate=0.01, momentum=0.9, nesterov=True), 10)
  assert type(adamw).__name__ == "AdamW" and type(sgd).__name__ == "SGD"
  assert sgd.nesterov and sgd.momentum == 0.9
  with pytest.raises(ValueError, match="kind must be"):
    WarmupSchedule(1.0, 10, kind="linear")
