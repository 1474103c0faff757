"""cliptransfer: pretrain CLIP-style models and transfer them to vision-and-language tasks."""

__version__ = "0.1.0"
