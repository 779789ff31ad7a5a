"""Procedurally rendered multi-task scenes: a ray-cast renderer (``render.py`` on ``geometry.py``)
and the datasets built on it (``datasets.py``); every label exact, nothing to download."""

from .datasets import SceneFolder, Scenes, write_scenes
from .render import SCENE_CLASSES, SCENE_PARTS, SCENE_TASKS, render, render_scene, sample_scene, scene_seed

__all__ = [
    "SCENE_CLASSES", "SCENE_PARTS", "SCENE_TASKS", "SceneFolder", "Scenes", "render", "render_scene",
    "sample_scene", "scene_seed", "write_scenes",
]
