"""Predict without a server: ``Predictor`` (Python) and ``faar-predict`` (command line).

``api``: the ``Predictor`` and its ``Prediction``; ``batch``: many images in a pipeline;
``cli``: the ``faar-predict`` shell over ``batch.run``.
"""

from __future__ import annotations

from .api import Prediction, Predictor

__all__ = ["Prediction", "Predictor"]
