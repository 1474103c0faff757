"""cliptransfer: pretrain CLIP-style models and transfer them to vision-and-language tasks."""

from cliptransfer.models import CLIP, create_clip, list_archs, load_clip

__all__ = ["CLIP", "create_clip", "list_archs", "load_clip"]
__version__ = "0.1.0"
