"""cliptransfer: pretrain CLIP-style models and transfer them to vision-and-language tasks."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["CLIP", "create_clip", "list_archs", "load_clip"]

if TYPE_CHECKING:
    from cliptransfer.clip import CLIP, create_clip, list_archs, load_clip


def __getattr__(name: str) -> Any:
    # Lazy: `import cliptransfer` (and the CLI's --help) must not pay for importing timm.
    if name in __all__:
        import cliptransfer.clip as models

        return getattr(models, name)
    raise AttributeError(f"module 'cliptransfer' has no attribute {name!r}")
