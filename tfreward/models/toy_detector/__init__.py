"""The toy_detector family: a fixed-slot detector that proves the harness, not a detector."""

from tfreward.models.toy_detector.model import ToyDetector, ToyDetectorOptions

__all__ = ["ToyDetector", "ToyDetectorOptions"]
