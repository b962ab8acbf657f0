"""The callbacks of the families' training recipes, built by name.

A family lists what its recipe needs as `RecipeCallback(name, kwargs)`s (`TaskModel.recipe_callbacks()`); models
never import `training`, so the names resolve here, once, in `recipe_callbacks(model, ...)`. The trainer puts them
before every other callback, so evaluation, checkpoints and logging see their effect; a user calling `model.fit`
directly does the same:

    model.fit(data, callbacks=recipes.recipe_callbacks(model) + my_callbacks)
"""

import keras

from tfreward.errors import check_int
from tfreward.training.ema import ModelEMA
from tfreward.training.reward_callback import RewardStatsCallback


class EnableL1LastEpochs(keras.callbacks.Callback):
  """Sets `model.l1_switch` to 1 from epoch `epochs - last_epochs` on (0 before), at the start of each epoch.

  YOLOX's recipe: the L1 box loss joins the last epochs (15 of 300). The model reads the int32 variable inside its
  step, so switching never retraces.
  """

  def __init__(self, last_epochs):
    super().__init__()
    check_int("last_epochs", last_epochs, minimum=0)
    self.last_epochs = last_epochs

  def on_epoch_begin(self, epoch, logs=None):
    epochs = (self.params or {}).get("epochs") or 0
    self.model.l1_switch.assign(1 if self.last_epochs and epoch >= epochs - self.last_epochs else 0)


# name -> callback class, called with the RecipeCallback's kwargs.
RECIPE_CALLBACKS = {
    "ema": ModelEMA,
    "l1_last_epochs": EnableL1LastEpochs,
    "reward_stats": RewardStatsCallback,
}


def recipe_callbacks(model, existing=(), *, log_dir=None):
  """The callbacks `model.recipe_callbacks()` names, except those of a class `existing` already holds.

  Args:
    model: a `TaskModel`.
    existing: callbacks the caller passes to `fit` anyway (an instance there replaces the recipe's default one).
    log_dir: optional str, the run's TensorBoard directory: `reward_stats` writes batch-level scalars to
      `<log_dir>/reward`. Defaults to None (none written).

  Returns:
    list of keras callbacks, to go before `existing`.
  """
  callbacks = []
  for spec in model.recipe_callbacks():
    if spec.name not in RECIPE_CALLBACKS:
      raise ValueError(f"{type(model).__name__} names an unknown recipe callback {spec.name!r}; known: "
                       f"{', '.join(sorted(RECIPE_CALLBACKS))}.")
    cls = RECIPE_CALLBACKS[spec.name]
    if any(isinstance(c, cls) for c in existing):
      continue
    kwargs = dict(spec.kwargs)
    if cls is RewardStatsCallback and log_dir is not None:
      kwargs.setdefault("log_dir", f"{log_dir}/reward")
    callbacks.append(cls(**kwargs))
  return callbacks
