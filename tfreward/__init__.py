"""tfreward: detection and segmentation with modern label assignment and task-reward tuning, TF2 + Keras 3."""

import importlib.util

__version__ = "0.1.0"

if importlib.util.find_spec("tensorflow") is None:
  raise ImportError("tfreward needs TensorFlow, which comes from an extra matching the accelerator: "
                    "pip install 'tfreward[cpu]', 'tfreward[gpu]' or 'tfreward[tpu]' (from a clone: "
                    "pip install -e '.[cpu]').")
