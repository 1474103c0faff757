"""CLIP model family: timm image towers, OpenAI-layout text tower, checkpoint interop."""

from __future__ import annotations

from .archs import CLIPConfig, TextConfig, UnknownArchError, VisionConfig, list_archs
from .convert import CheckpointError
from .loading import load_clip
from .model import CLIP, CLIPOutput, create_clip

__all__ = [
    "CLIP",
    "CLIPConfig",
    "CLIPOutput",
    "CheckpointError",
    "TextConfig",
    "UnknownArchError",
    "VisionConfig",
    "create_clip",
    "list_archs",
    "load_clip",
]
