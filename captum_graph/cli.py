"""The ``captum-graph`` command line: ``demo``, ``inspect`` and ``explain``.

Bad input (a missing image, an unknown model, weights that do not fit, ...)
ends with one line on stderr, ``captum-graph: error: ...``, and exit code 2;
``inspect`` exits with 1 when the model has operations without an LRP rule.
"""
import argparse
import importlib
import json
import os
import sys
from typing import Any, Dict, Iterable, List, Mapping, NoReturn, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .errors import CaptumGraphError

__all__ = ["main", "load_model", "load_weights", "UsageError"]

METHODS = ("lrp", "gradcam", "ixg")
METHOD_TITLES = {"lrp": "LRP", "gradcam": "Grad-CAM", "ixg": "Input × Gradient"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MODEL_HELP = "torchvision:NAME, timm:NAME or path/to/file.py:factory"


class UsageError(Exception):
    """Bad command-line input: printed as one line, exit code 2."""


# ---------------------------------------------------------------------------
# models and weights
# ---------------------------------------------------------------------------
def load_model(spec: str, num_classes: Optional[int] = None) -> nn.Module:
    """Build a model, in eval mode, from ``torchvision:NAME``, ``timm:NAME`` or ``path/to/file.py:factory``.

    torchvision and timm models are built without pretrained weights.
    ``num_classes`` is passed on to the builder when given.

    Raises:
        UsageError: an unknown model, a missing file or factory, or a factory that fails.
    """
    kind, _, name = spec.rpartition(":")
    if not kind or not name:
        raise UsageError(f"model must look like {MODEL_HELP}, got {spec!r}")
    extra = {} if num_classes is None else {"num_classes": num_classes}
    if kind == "torchvision":
        import torchvision

        if name not in torchvision.models.list_models():
            raise UsageError(f"unknown torchvision model {name!r}; see torchvision.models.list_models()")
        try:
            return torchvision.models.get_model(name, weights=None, **extra).eval()
        except Exception as error:  # e.g. a builder that takes no num_classes
            raise UsageError(f"could not build torchvision model {name!r}: {type(error).__name__}: {_first_line(error)}") from error
    if kind == "timm":
        try:
            timm = importlib.import_module("timm")
        except ImportError as error:
            raise UsageError("timm models need timm: pip install timm") from error
        try:
            return timm.create_model(name, pretrained=False, **extra).eval()
        except RuntimeError as error:  # timm's "Unknown model (...)"
            raise UsageError(f"unknown timm model {name!r}; see timm.list_models() ({_first_line(error)})") from error
    return _model_from_file(kind, name, extra)


def _model_from_file(path: str, factory: str, kwargs: Dict[str, Any]) -> nn.Module:
    import importlib.util

    if not path.endswith(".py"):
        raise UsageError(f"model must look like {MODEL_HELP}, got {path}:{factory}")
    if not os.path.isfile(path):
        raise UsageError(f"model file not found: {path}")
    spec = importlib.util.spec_from_file_location("captum_graph_user_model", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as error:  # the user's file: any error it raises is bad input here
        raise UsageError(f"could not import {path}: {type(error).__name__}: {_first_line(error)}") from error
    build = getattr(module, factory, None)
    if not callable(build):
        raise UsageError(f"{path} has no callable {factory!r}")
    try:
        model = build(**kwargs)
    except Exception as error:
        raise UsageError(f"{path}:{factory}() failed: {type(error).__name__}: {_first_line(error)}") from error
    if not isinstance(model, nn.Module):
        raise UsageError(f"{path}:{factory}() returned {type(model).__name__}, not a torch.nn.Module")
    return model.eval()


def load_weights(model: nn.Module, path: str) -> nn.Module:
    """Load a state_dict from ``path`` into ``model`` with ``torch.load(..., weights_only=True)``.

    Checkpoints that wrap the state_dict (``{"state_dict": ...}``,
    ``{"model": ...}``) are unwrapped, and a ``module.`` prefix (DataParallel)
    is removed. Never unpickles arbitrary objects.

    Raises:
        UsageError: the file is missing or is not a state_dict, or its keys or
            shapes do not fit the model (the message names them).
    """
    if not os.path.isfile(path):
        raise UsageError(f"weights file not found: {path}")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for bad files
        raise UsageError(
            f"cannot load weights from {path}: not a PyTorch state_dict file readable with weights_only=True "
            f"({type(error).__name__}: {_first_line(error)[:160]})"
        ) from error
    state = _unwrap_state_dict(loaded, path)
    expected = model.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    mismatched = [
        f"{key} (file {tuple(state[key].shape)}, model {tuple(expected[key].shape)})"
        for key in expected
        if key in state and isinstance(state[key], Tensor) and state[key].shape != expected[key].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listing(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatch: {_listing(mismatched)}")
    if problems:
        raise UsageError(f"weights in {path} do not fit {type(model).__name__}: " + "; ".join(problems))
    model.load_state_dict(state)
    return model.eval()


def _unwrap_state_dict(loaded: Any, path: str) -> Mapping[str, Tensor]:
    if isinstance(loaded, Mapping):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(loaded.get(key), Mapping):
                loaded = loaded[key]
                break
    if not isinstance(loaded, Mapping) or not all(isinstance(v, Tensor) for v in loaded.values()):
        raise UsageError(f"{path} holds a {type(loaded).__name__}, not a state_dict of tensors")
    if loaded and all(key.startswith("module.") for key in loaded):
        loaded = {key[len("module.") :]: value for key, value in loaded.items()}
    return loaded


def _listing(items: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return f"{shown} and {len(items) - limit} more" if len(items) > limit else shown


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# ---------------------------------------------------------------------------
# inspect
# ---------------------------------------------------------------------------
def _inspect(args: argparse.Namespace) -> int:
    from .report import format_report, model_report

    model = load_model(args.model)
    if args.weights:
        load_weights(model, args.weights)
    report = model_report(model, preset=args.preset)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_report(report, max_rules=None if args.all else 40))
    return 1 if report["unsupported"] else 0


# ---------------------------------------------------------------------------
# explain
# ---------------------------------------------------------------------------
def _methods(values: Optional[List[str]]) -> List[str]:
    chosen: List[str] = []
    for value in values or ["lrp"]:
        for method in (part.strip().lower() for part in value.split(",")):
            if method not in METHODS:
                raise UsageError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
            if method not in chosen:
                chosen.append(method)
    return chosen


def _target(value: str) -> Optional[int]:
    if value == "auto":
        return None
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"--target must be 'auto' or a class index, got {value!r}") from None


def _check_images(paths: Sequence[str]) -> None:
    from PIL import Image, UnidentifiedImageError

    for path in paths:
        if not os.path.isfile(path):
            raise UsageError(f"image not found: {path}")
        try:
            with Image.open(path) as image:
                image.verify()
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
            raise UsageError(f"cannot read image {path}: {_first_line(error)}") from error


def _output_dir(path: str) -> str:
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, ".captum_graph_write_test")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise UsageError(f"output directory {path} is not writable: {reason}") from error
    return path


def _preprocess(path: str, size: int, mean: Sequence[float], std: Sequence[float]) -> Tuple[Tensor, Tensor]:
    """(normalised input, the same image in [0, 1] for drawing), both (3, size, size)."""
    from PIL import Image
    from torchvision.transforms import functional as TF

    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
    except OSError as error:
        raise UsageError(f"cannot read image {path}: {_first_line(error)}") from error
    rgb = TF.center_crop(TF.resize(rgb, size), [size, size])
    pixels = TF.to_tensor(rgb)
    return TF.normalize(pixels, list(mean), list(std)), pixels


def _output_names(paths: Sequence[str]) -> List[str]:
    stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    return [f"{i:03d}_{stem}" if stems.count(stem) > 1 else stem for i, stem in enumerate(stems)]


def _batches(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class _Progress:
    """tqdm when installed and stderr is a terminal, else a line per batch when there are several."""

    def __init__(self, total: int, batches: int) -> None:
        self.done, self.total, self.batches = 0, total, batches
        try:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="explaining", unit="image", disable=None)
        except ImportError:
            self.bar = None

    def update(self, count: int) -> None:
        self.done += count
        if self.bar is not None:
            self.bar.update(count)
        elif self.batches > 1:
            print(f"  {self.done}/{self.total} images", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _explainers(model: nn.Module, methods: Sequence[str], preset: Any, layer: Optional[str]) -> Dict[str, Any]:
    from captum.attr import InputXGradient

    from .attr import LRP, LayerGradCam
    from .rules import raise_for_problems

    built: Dict[str, Any] = {}
    if "lrp" in methods:
        built["lrp"] = LRP(model, preset=preset)
        raise_for_problems(built["lrp"].rule_report())  # an unsupported operation stops us before any image
    if "gradcam" in methods:
        built["gradcam"] = LayerGradCam(model, layer)
    if "ixg" in methods:
        built["ixg"] = InputXGradient(model)
    return built


def _lrp_preset(preset: Optional[str], mean: Sequence[float], std: Sequence[float]) -> Any:
    """The preset by name; ``epsilon-gamma-box`` bounded by the normalised black and white pixel."""
    if preset != "epsilon-gamma-box":
        return preset
    from .rules import epsilon_gamma_box

    centre, scale = torch.tensor(mean).reshape(-1, 1, 1), torch.tensor(std).reshape(-1, 1, 1)
    return epsilon_gamma_box(-centre / scale, (1 - centre) / scale)


def _attribute(method: str, explainer: Any, inputs: Tensor, targets: Tensor) -> Tensor:
    # Inputs that already require gradients spare Captum's "did not already require gradients" warning.
    inputs = inputs.detach().requires_grad_()
    if method == "gradcam":
        return explainer.attribute(inputs, target=targets, relu_attributions=True).detach()
    return explainer.attribute(inputs, target=targets).detach()


def _title(method: str, explainer: Any, preset: Optional[str], target: int) -> str:
    if method == "lrp":
        name = f"LRP ({preset})" if preset else "LRP"
    elif method == "gradcam":
        name = f"Grad-CAM ({explainer.layer_name})"
    else:
        name = METHOD_TITLES[method]
    return f"{name}, class {target}"


def _explain(args: argparse.Namespace) -> int:
    from . import viz

    methods = _methods(args.method)
    requested = _target(args.target)
    if args.size < 8:
        raise UsageError(f"--size must be at least 8, got {args.size}")
    if len(args.mean) not in (1, 3) or len(args.std) not in (1, 3) or any(s <= 0 for s in args.std):
        raise UsageError("--mean and --std take 1 or 3 values (images are read as RGB), and --std values must be positive")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be positive, got {args.batch_size}")
    viz.require_matplotlib()
    _check_images(args.image)
    out = _output_dir(args.out)

    model = load_model(args.model, args.num_classes)
    if args.weights:
        load_weights(model, args.weights)
    model.eval()
    explainers = _explainers(model, methods, _lrp_preset(args.preset, args.mean, args.std), args.layer)
    names = _output_names(args.image)
    batches = list(_batches(list(range(len(args.image))), args.batch_size))
    progress = _Progress(len(args.image), len(batches))
    written: List[str] = []
    try:
        for batch in batches:
            pairs = [_preprocess(args.image[i], args.size, args.mean, args.std) for i in batch]
            inputs = torch.stack([p[0] for p in pairs])
            try:
                with torch.no_grad():
                    outputs = model(inputs)
            except Exception as error:  # e.g. a model that needs another input size
                raise UsageError(
                    f"the model failed on {args.size}x{args.size} images (see --size): {type(error).__name__}: {_first_line(error)}"
                ) from error
            if not isinstance(outputs, Tensor) or outputs.dim() != 2:
                shape = tuple(outputs.shape) if isinstance(outputs, Tensor) else type(outputs).__name__
                raise UsageError(f"the model's output is {shape}; explain needs a (batch, classes) tensor")
            classes = outputs.shape[1]
            if requested is not None and not 0 <= requested < classes:
                raise UsageError(f"target {requested} is out of range: the model has {classes} outputs (0..{classes - 1})")
            targets = outputs.argmax(1) if requested is None else torch.full((len(batch),), requested)
            for method in methods:
                maps = _attribute(method, explainers[method], inputs, targets)
                for k, i in enumerate(batch):
                    path = os.path.join(out, f"{names[i]}_{method}.png")
                    title = _title(method, explainers[method], args.preset, int(targets[k]))
                    viz.save_attribution_png(path, "gradcam" if method == "gradcam" else "relevance", maps[k], pairs[k][1], title)
                    written.append(path)
            progress.update(len(batch))
    finally:
        progress.close()
    target_text = "the predicted class" if requested is None else f"class {requested}"
    noun = "overlay" if len(written) == 1 else "overlays"
    print(f"Wrote {len(written)} heatmap {noun} ({', '.join(methods)}; {target_text}) to {out}/")
    for path in written:
        print(f"  {path}")
    return 0


# ---------------------------------------------------------------------------
# demo
# ---------------------------------------------------------------------------
def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args)


# ---------------------------------------------------------------------------
# the parser
# ---------------------------------------------------------------------------
_EPILOG = """examples:
  captum-graph demo                                   train a digits CNN and explain it (writes captum_graph_demo/)
  captum-graph inspect torchvision:resnet50           what captum_graph does with a model
  captum-graph explain torchvision:resnet18 --weights resnet18.pth \\
      --image cat.jpg dog.png --method lrp,gradcam --out heatmaps/
"""


def _floats(count_hint: str) -> Any:
    def parse(value: str) -> float:
        try:
            return float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{count_hint} must be numbers, got {value!r}") from None

    return parse


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors that point to ``--help``."""

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    from .rules import PRESETS

    preset_names = ", ".join(PRESETS) + " (default: epsilon)"
    from .demo import add_arguments as add_demo_arguments

    parser = _Parser(
        prog="captum-graph",
        description="Graph-aware LRP and layer attribution for Captum: explain the model you actually have.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="train a small residual CNN on scikit-learn's digits and explain it (figures, conservation, pixel flipping)",
        description="Train a small CNN with residual additions, a concatenation and a squeeze-excitation gate on "
        "scikit-learn's bundled digits, explain test digits with LRP, Grad-CAM and InputXGradient, and write a figure, "
        "a conservation table and pixel-flipping curves.",
    )
    add_demo_arguments(demo)
    demo.set_defaults(run=_demo)

    inspect = commands.add_parser(
        "inspect",
        help="print the graph rewrite and LRP rule report of a model",
        description="Trace a model and report the functional operations rewritten into modules, the LRP rule of "
        "every node, the automatic Grad-CAM layer and any unsupported operation with its source line. "
        "Exit code 1 if something is unsupported.",
    )
    inspect.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    inspect.add_argument("--weights", metavar="FILE", help="state_dict to load (torch.load with weights_only=True)")
    inspect.add_argument("--preset", default=None, help=f"rule preset: {preset_names} (README: Choosing a preset)")
    inspect.add_argument("--json", action="store_true", help="print the report as JSON")
    inspect.add_argument("--all", action="store_true", help="list the rule of every node")
    inspect.set_defaults(run=_inspect)

    explain = commands.add_parser(
        "explain",
        help="write heatmap overlays of images explained by LRP, Grad-CAM or InputXGradient",
        description="Load images, preprocess them (resize the short side, centre-crop, normalise), run the model and "
        "write one PNG per image and method, IMAGE_METHOD.png: the image next to the heatmap laid over it.",
    )
    explain.add_argument("model", metavar="MODEL", help=MODEL_HELP + " (torchvision and timm models are built without weights)")
    explain.add_argument("--weights", metavar="FILE", help="state_dict to load (torch.load with weights_only=True)")
    explain.add_argument("--num-classes", type=int, default=None, metavar="N", help="build the model with N outputs, to fit --weights")
    what = explain.add_argument_group("what to explain")
    what.add_argument("--image", nargs="+", action="extend", required=True, metavar="PATH", help="image files (repeatable)")
    what.add_argument(
        "--method", action="append", metavar="METHOD",
        help="lrp, gradcam or ixg (InputXGradient); repeat it or give a comma list (default: lrp)",
    )
    what.add_argument("--target", default="auto", help="class to explain: 'auto', the predicted class (default), or an index")
    what.add_argument(
        "--preset", default=None,
        help=f"LRP rule preset: {preset_names}; epsilon-gamma-box bounds the input by --mean/--std's normalised 0 and 1",
    )
    what.add_argument("--layer", default=None, help="Grad-CAM layer, a module or graph node name (default: chosen automatically)")
    pre = explain.add_argument_group("preprocessing")
    pre.add_argument("--size", type=int, default=224, help="resize the short side to SIZE, then centre-crop SIZE x SIZE (default: 224)")
    pre.add_argument("--mean", type=_floats("--mean"), nargs="+", default=list(IMAGENET_MEAN), metavar="M", help="normalisation mean per channel (default: ImageNet's, 0.485 0.456 0.406)")
    pre.add_argument("--std", type=_floats("--std"), nargs="+", default=list(IMAGENET_STD), metavar="S", help="normalisation std per channel (default: ImageNet's, 0.229 0.224 0.225)")
    pre.add_argument("--batch-size", type=int, default=8, metavar="N", help="images per forward pass (default: 8)")
    output = explain.add_argument_group("output")
    output.add_argument("--out", required=True, metavar="DIR", help="output directory, created if needed")
    explain.set_defaults(run=_explain)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line; returns the exit code."""
    args = _parser().parse_args(argv)
    try:
        return args.run(args)
    except BrokenPipeError:  # e.g. `captum-graph inspect ... | head`: stop quietly, as other tools do
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except (UsageError, CaptumGraphError, OSError, ValueError, ImportError) as error:
        print(f"captum-graph: error: {_first_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("captum-graph: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
