"""The fusion heads by name: `model.arch=NAME` builds the head registered as NAME.

    @register_head("mcan")
    def mcan(cfg: HeadConfig, question: nn.Module, visual_dim: int, num_outputs: int,
             spatial: int) -> nn.Module: ...

A head module registers itself when imported; `head_names()` / `get_head()` import every module of
`cliptransfer.heads` once (timm's `@register_model` pattern), so a new head (the V&L-pretrained
transformer) plugs in by adding its module.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from typing import Any

from torch import nn

__all__ = ["get_head", "head_names", "register_head"]

HeadBuilder = Callable[[Any, nn.Module, int, int, int], nn.Module]
_HEADS: dict[str, HeadBuilder] = {}
_DISCOVERED = False


def register_head(name: str) -> Callable[[HeadBuilder], HeadBuilder]:
    def wrap(fn: HeadBuilder) -> HeadBuilder:
        if name in _HEADS and _HEADS[name].__qualname__ != fn.__qualname__:
            raise ValueError(f"head {name!r} is registered twice")
        _HEADS[name] = fn
        return fn

    return wrap


def _discover() -> None:
    global _DISCOVERED
    if not _DISCOVERED:
        import cliptransfer.heads as heads

        for info in pkgutil.iter_modules(heads.__path__):
            importlib.import_module(f"cliptransfer.heads.{info.name}")
        _DISCOVERED = True


def head_names() -> list[str]:
    _discover()
    return sorted(_HEADS)


def get_head(name: str) -> HeadBuilder:
    _discover()
    if name not in _HEADS:
        raise ValueError(
            f"model.arch={name!r} is not a registered head: choose from {head_names()}"
        )
    return _HEADS[name]
