"""Captum's call arguments as the positional arguments of one forward call."""
from typing import Any, Tuple

from captum._utils.common import _format_additional_forward_args, _format_tensor_into_tuples

__all__ = ["call_arguments"]


def call_arguments(inputs: Any, additional_forward_args: Any = None) -> Tuple[Any, ...]:
    """``inputs`` followed by ``additional_forward_args``, as Captum passes them to the model."""
    additional = _format_additional_forward_args(additional_forward_args)
    return _format_tensor_into_tuples(inputs) + (tuple(additional) if additional is not None else ())
