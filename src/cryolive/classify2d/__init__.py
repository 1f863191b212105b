"""Streaming 2D classification (a model object with ``update(batch)``, ``snapshot()`` and state)."""

from .streaming import BatchResult, Class2DSnapshot, StreamingClassifier2D, rotate_images_2d

__all__ = ["StreamingClassifier2D", "BatchResult", "Class2DSnapshot", "rotate_images_2d"]
