"""Drop-in replacements for ``captum.attr`` classes that work on the model's graph."""
from ._lrp import LayerLRP, LRP

__all__ = ["LRP", "LayerLRP"]
