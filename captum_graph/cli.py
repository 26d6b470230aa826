"""The ``captum-graph`` command line: ``demo`` and ``inspect``."""
import argparse
import importlib
import json
import sys
from typing import Callable, List, Optional

import torch
from torch import nn

from .errors import CaptumGraphError
from .report import format_report, model_report

__all__ = ["main", "load_model"]


class UsageError(Exception):
    """Bad command-line input: printed as one line, exit code 2."""


def load_model(spec: str) -> nn.Module:
    """Build a model from ``torchvision:NAME``, ``timm:NAME`` or ``path/to/file.py:factory``."""
    kind, _, name = spec.partition(":")
    if not name:
        raise UsageError(f"model must look like torchvision:NAME, timm:NAME or file.py:factory, got {spec!r}")
    if kind == "torchvision":
        import torchvision

        if name not in torchvision.models.list_models():
            raise UsageError(f"unknown torchvision model {name!r}; see torchvision.models.list_models()")
        return torchvision.models.get_model(name, weights=None).eval()
    if kind == "timm":
        try:
            timm = importlib.import_module("timm")
        except ImportError as error:
            raise UsageError("timm models need timm: pip install timm") from error
        return timm.create_model(name, pretrained=False).eval()
    return _model_from_file(kind, name)


def _model_from_file(path: str, factory: str) -> nn.Module:
    import importlib.util
    import os

    if not os.path.isfile(path):
        raise UsageError(f"model file not found: {path}")
    spec = importlib.util.spec_from_file_location("captum_graph_user_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    build = getattr(module, factory, None)
    if not callable(build):
        raise UsageError(f"{path} has no callable {factory!r}")
    return build().eval()


def _inspect(args: argparse.Namespace) -> int:
    report = model_report(load_model(args.model), preset=args.preset)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_report(report, max_rules=None if args.all else 40))
    return 1 if report["unsupported"] else 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="captum-graph",
        description="Graph-aware LRP and layer attribution for Captum: see what captum_graph does with a model.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="explain a torchvision ResNet-18 with LRP and automatic Grad-CAM")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.set_defaults(run=_demo)
    inspect = commands.add_parser("inspect", help="print the graph rewrite and LRP rule report of a model")
    inspect.add_argument("model", help="torchvision:NAME, timm:NAME or path/to/file.py:factory")
    inspect.add_argument("--preset", default=None, help="rule preset: epsilon, epsilon-plus-flat, epsilon-gamma-box")
    inspect.add_argument("--json", action="store_true", help="print the report as JSON")
    inspect.add_argument("--all", action="store_true", help="list the rule of every node")
    inspect.set_defaults(run=_inspect)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.run(args)
    except (UsageError, CaptumGraphError, OSError, ValueError) as error:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        print(f"captum-graph: error: {first_line}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
