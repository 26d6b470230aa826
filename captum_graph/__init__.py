"""Graph-aware LRP and layer attribution for Captum."""
from .architecture import ModelArchitecture, NodeInfo
from .errors import CaptumGraphError, LayerResolutionError, TracingError, UnsupportedOperationError
from .extract import ActivationExtractor
from .prepare import prepare
from .rules import register_rule
from .tracing import register_leaf_function, register_leaf_module, trace

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
    "register_leaf_function",
    "trace",
]
