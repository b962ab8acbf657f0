"""Benchmark: the deeplab train step under XLA on CPU, with tfreward's dilated convs and dropout against Keras'.

Run from the repository root (CPU):

  python bench/deeplab_step.py

Keras' Conv2D with a dilation rate reaches `tf.nn.convolution`, which off TPU lowers a dilated conv as
space_to_batch -> conv -> batch_to_space; `keras.layers.Dropout` draws its mask with the default ("auto_select") RNG.
Under XLA on CPU both are slow. tfreward's `ConvBN` calls `tf.nn.conv2d(..., dilations=d)` on the same kernel and
`tfreward.models.layers.dropout.Dropout` names Philox. The columns time one train step (milliseconds, median of the
timed steps after warm-up) of the shapes config's model (resnet18 width 16, 128 x 128, batch 16, 7 classes) at
output stride 8 and 16 with dropout 0.1: tfreward's layers, Keras' layers, and their ratio. Both variants compute
the same function (same kernels; dropout masks differ, being other random draws).
"""

import os
import platform
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tfreward.models import backbones  # noqa: E402
from tfreward.models.deeplab import DeepLab, layers  # noqa: E402

STEPS = 8


def keras_conv_bn_call(self, x, training=False):
  """ConvBN.call as it was: Keras' Conv2D for every dilation."""
  x = self.bn(self.conv(x), training=training)
  return tf.nn.relu(x) if self.relu else x


def step_ms(output_stride, keras_layers):
  saved = backbones.ConvBN.call, layers.Dropout
  if keras_layers:
    backbones.ConvBN.call, layers.Dropout = keras_conv_bn_call, keras.layers.Dropout
  try:
    keras.utils.set_random_seed(0)
    model = DeepLab({"backbone": "resnet18", "backbone_width": 16, "output_stride": output_stride,
                     "aspp_channels": 64, "aspp_rates": (2, 4, 6), "dropout": 0.1, "sync_bn": False},
                    num_classes=7, image_size=(128, 128))
    model.compile(optimizer=keras.optimizers.AdamW(1e-3), jit_compile=True)
    model.build_for_training()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (16, 128, 128, 3)).astype(np.uint8)
    masks = rng.integers(0, 7, (16, 128, 128)).astype(np.int32)
    data = tf.data.Dataset.from_tensors((images, {"mask": masks})).repeat()
    iterator = iter(data)
    model.fit(data, steps_per_epoch=2, epochs=1, verbose=0)  # compile
    times = []
    for _ in range(STEPS):
      start = time.perf_counter()
      model.train_on_batch(*next(iterator))
      times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)
  finally:
    backbones.ConvBN.call, layers.Dropout = saved


def main():
  print(f"TensorFlow {tf.__version__}, Keras {keras.__version__}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs")
  print("| output stride | tfreward layers (ms/step) | Keras layers (ms/step) | Keras / tfreward |")
  print("|---|---|---|---|")
  for output_stride in (8, 16):
    ours, theirs = step_ms(output_stride, False), step_ms(output_stride, True)
    print(f"| {output_stride} | {ours:.0f} | {theirs:.0f} | {theirs / ours:.1f}x |")


if __name__ == "__main__":
  main()
