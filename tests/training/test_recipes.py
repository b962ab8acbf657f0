"""Recipe callbacks are named by the model and built once, here."""

import keras
import pytest

from tfreward.models.base import RecipeCallback
from tfreward.models.toy_detector import ToyDetector
from tfreward.training import recipes
from tfreward.training.ema import ModelEMA
from tfreward.training.reward_callback import RewardStatsCallback


class WithRecipe(ToyDetector):
  names = (RecipeCallback("ema", {"decay": 0.99, "ramp_updates": 10.0}),
           RecipeCallback("l1_last_epochs", {"last_epochs": 2}), RecipeCallback("reward_stats", {}))

  def recipe_callbacks(self):
    return list(self.names)


def _model(cls=WithRecipe):
  return cls(num_classes=3, image_size=(32, 32))


def test_names_become_callbacks_in_order():
  callbacks = recipes.recipe_callbacks(_model(), log_dir="/tmp/run/logs")
  assert [type(c) for c in callbacks] == [ModelEMA, recipes.EnableL1LastEpochs, RewardStatsCallback]
  assert callbacks[0].decay == 0.99 and callbacks[0].ramp_updates == 10.0
  assert callbacks[1].last_epochs == 2
  assert callbacks[2].log_dir == "/tmp/run/logs/reward"


def test_a_callback_the_caller_passes_replaces_the_recipes():
  mine = ModelEMA(decay=0.5)
  callbacks = recipes.recipe_callbacks(_model(), [mine, keras.callbacks.History()])
  assert [type(c) for c in callbacks] == [recipes.EnableL1LastEpochs, RewardStatsCallback]
  assert callbacks[1].log_dir is None


def test_a_model_without_recipe_gets_none():
  assert recipes.recipe_callbacks(_model(ToyDetector)) == []


def test_unknown_name_is_a_clear_error():
  class Bad(ToyDetector):
    def recipe_callbacks(self):
      return [RecipeCallback("swa", {})]
  with pytest.raises(ValueError, match="unknown recipe callback 'swa'; known: ema, l1_last_epochs, reward_stats"):
    recipes.recipe_callbacks(_model(Bad))


@pytest.mark.parametrize("epochs, last, switched_on", [(5, 2, [0, 0, 0, 1, 1]), (3, 0, [0, 0, 0]), (2, 5, [1, 1])])
def test_l1_switch_follows_the_epochs(epochs, last, switched_on):
  class Switchable:
    def __init__(self):
      self.l1_switch = keras.Variable(0, dtype="int32")
  callback = recipes.EnableL1LastEpochs(last)
  callback.params = {"epochs": epochs}
  model = Switchable()
  callback._model = model
  seen = []
  for epoch in range(epochs):
    callback.on_epoch_begin(epoch)
    seen.append(int(model.l1_switch.numpy()))
  assert seen == switched_on


def test_l1_last_epochs_rejects_negative():
  with pytest.raises(ValueError, match="last_epochs must be a non-negative int"):
    recipes.EnableL1LastEpochs(-1)
