"""Drop-in replacements for ``captum.attr`` classes that work on the model's graph."""
from ._layer import (
    GuidedGradCam,
    LayerActivation,
    LayerConductance,
    LayerDeepLift,
    LayerGradCam,
    LayerGradientXActivation,
    LayerIntegratedGradients,
)
from ._lrp import LayerLRP, LRP

__all__ = [
    "LRP",
    "LayerLRP",
    "LayerGradCam",
    "LayerActivation",
    "LayerGradientXActivation",
    "LayerIntegratedGradients",
    "LayerConductance",
    "LayerDeepLift",
    "GuidedGradCam",
]
