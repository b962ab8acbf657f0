"""tfreward: detection and segmentation with modern label assignment and task-reward tuning, TF2 + Keras 3."""

__version__ = "0.1.0"
