"""Streaming 2D classification (a model object with ``update(batch)``, ``snapshot()`` and state), class
statistics and selection (automatic score plus manual overrides), templates and particle sets from selected
classes."""

from .selection import (
    ClassSelection,
    ClassStatistics,
    class_statistics,
    select_classes,
    selected_particles,
    selected_templates,
)
from .streaming import BatchResult, Class2DSnapshot, StreamingClassifier2D, rotate_images_2d

__all__ = [
    "StreamingClassifier2D",
    "BatchResult",
    "Class2DSnapshot",
    "rotate_images_2d",
    "ClassStatistics",
    "ClassSelection",
    "class_statistics",
    "select_classes",
    "selected_templates",
    "selected_particles",
]
