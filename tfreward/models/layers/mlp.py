"""A stack of Dense layers: the MLP of DETR's heads and of Transformer feed-forward blocks."""

import keras


class MLP(keras.layers.Layer):
  """`num_layers` Dense layers with `activation` between them: [..., Din] -> [..., output_dim].

  Args:
    hidden_dim: int. Width of the hidden layers.
    output_dim: int. Width of the output.
    num_layers: int >= 1. Dense layers, named dense0, dense1, ...
    activation: str. Activation after every layer but the last. Defaults to "relu".
    zero_last: bool. Zero weights and bias in the last layer (DETR's box head init). Defaults to False.
  """

  def __init__(self, hidden_dim, output_dim, num_layers, activation="relu", zero_last=False, **kwargs):
    super().__init__(**kwargs)
    if int(num_layers) < 1:
      raise ValueError(f"num_layers must be >= 1, got {num_layers!r}.")
    self.hidden_dim, self.output_dim, self.num_layers = int(hidden_dim), int(output_dim), int(num_layers)
    self.activation, self.zero_last = activation, bool(zero_last)
    init = dict(kernel_initializer="zeros", bias_initializer="zeros") if zero_last else {}
    self.dense = [keras.layers.Dense(hidden_dim, activation=activation, name=f"dense{i}")
                  for i in range(num_layers - 1)]
    self.dense.append(keras.layers.Dense(output_dim, name=f"dense{num_layers - 1}", **init))

  def build(self, input_shape):
    shape = list(input_shape)
    for dense in self.dense:
      dense.build(shape)
      shape = shape[:-1] + [dense.units]

  def call(self, x):
    for dense in self.dense:
      x = dense(x)
    return x

  def get_config(self):
    config = super().get_config()
    config.update(hidden_dim=self.hidden_dim, output_dim=self.output_dim, num_layers=self.num_layers,
                  activation=self.activation, zero_last=self.zero_last)
    return config
