"""Graph-aware LRP and layer attribution for Captum."""
from .architecture import ModelArchitecture, NodeInfo
from .errors import CaptumGraphError, CaptureError, LayerResolutionError, NonFiniteError, TracingError, UnsupportedOperationError
from .extract import ActivationExtractor
from .prepare import prepare
from .passes import register_leaf_module
from .rules import register_rule


__version__ = "0.1.0"

__all__ = [
    "ModelArchitecture",
    "NodeInfo",
    "ActivationExtractor",
    "CaptumGraphError",
    "TracingError",
    "UnsupportedOperationError",
    "LayerResolutionError",
    "prepare",
    "register_rule",
    "register_leaf_module",
    "CaptureError",
    "NonFiniteError",
]
