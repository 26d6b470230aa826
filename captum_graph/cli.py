"""The ``captum-graph`` command line: ``demo``, ``inspect``, ``explain``, ``attribute`` and ``evaluate``.

``explain`` takes images (torchvision, timm and file models) or, with
``--text``, texts for a Hugging Face text classifier saved in a local folder
(``hf:PATH``), printed per token in the terminal.

Bad input (a missing image, an unknown model, weights that do not fit, ...)
ends with one line on stderr, ``captum-graph: error: ...``, and exit code 2;
``inspect`` exits with 1 when the model has operations without an LRP rule.
"""
import argparse
import functools
import importlib
import json
import os
import sys
from typing import Any, Dict, Iterable, List, Mapping, NoReturn, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .errors import CaptumGraphError

__all__ = ["main", "load_model", "load_hf", "load_weights", "UsageError"]

METHODS = ("lrp", "gradcam", "ixg")
METHOD_TITLES = {"lrp": "LRP", "gradcam": "Grad-CAM", "ixg": "Input × Gradient"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MODEL_HELP = "torchvision:NAME, timm:NAME, path/to/file.py:factory or hf:FOLDER"
HF_PREFIX = "hf:"
#: Files of which a save_pretrained tokenizer folder has at least one.
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model")


class UsageError(Exception):
    """Bad command-line input: printed as one line, exit code 2."""


# ---------------------------------------------------------------------------
# models and weights
# ---------------------------------------------------------------------------
def load_model(spec: str, num_classes: Optional[int] = None) -> nn.Module:
    """Build a model, in eval mode, from ``torchvision:NAME``, ``timm:NAME``, ``path/to/file.py:factory`` or ``hf:FOLDER``.

    torchvision and timm models are built without pretrained weights.
    ``num_classes`` is passed on to the builder when given. ``hf:FOLDER``
    loads a Hugging Face model saved there (:func:`load_hf` gives its tokenizer too).

    Raises:
        UsageError: an unknown model, a missing file or factory, or a factory that fails.
    """
    if spec.startswith(HF_PREFIX):
        if num_classes is not None:
            raise UsageError("--num-classes is for image models; an hf: folder holds its own configuration")
        return load_hf(spec[len(HF_PREFIX) :])[0]
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


def load_hf(folder: str) -> Tuple[nn.Module, Any]:
    """A Hugging Face model (eval mode) and its tokenizer from a local ``save_pretrained`` folder.

    Nothing is downloaded. The model class is the one named in the folder's
    ``config.json`` (``architectures``), else ``AutoModelForSequenceClassification``.

    Raises:
        UsageError: transformers is missing, or the folder holds no model or no tokenizer.
    """
    if not os.path.isdir(folder):
        raise UsageError(f"hf: model folder not found: {folder}")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise UsageError(f"{folder} has no config.json: save the model there with model.save_pretrained({folder!r})")
    try:
        transformers = importlib.import_module("transformers")
    except ImportError as error:
        raise UsageError("hf: models need transformers: pip install 'captum_graph[text]'") from error
    progress_bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars would end up among our messages
    try:
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
        named = [getattr(transformers, name, None) for name in (config.architectures or [])]
        model_class = next((c for c in named if c is not None), transformers.AutoModelForSequenceClassification)
        model = model_class.from_pretrained(folder, local_files_only=True)
    except Exception as error:  # transformers raises OSError, ValueError, KeyError, ... for folders it cannot read
        raise UsageError(f"cannot load a model from {folder}: {type(error).__name__}: {_first_line(error)}") from error
    finally:
        if progress_bars:
            transformers.utils.logging.enable_progress_bar()
    # Without these files transformers 5 builds an empty tokenizer that reads every word as unknown.
    if not any(os.path.isfile(os.path.join(folder, name)) for name in TOKENIZER_FILES):
        raise UsageError(f"{folder} holds no tokenizer: save it there with tokenizer.save_pretrained({folder!r})")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as error:
        raise UsageError(
            f"cannot load a tokenizer from {folder} ({type(error).__name__}: {_first_line(error)[:120]}); "
            f"save it there with tokenizer.save_pretrained({folder!r})"
        ) from error
    return model.eval(), tokenizer


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

    if args.model.startswith(HF_PREFIX):
        if args.weights:
            raise UsageError("--weights is for image models; an hf: folder holds its own weights")
        model, inputs = _text_model_at_example(args.model[len(HF_PREFIX) :])
        report = model_report(model, preset=args.preset, inputs=inputs)
    else:
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


def _check_preprocessing(args: argparse.Namespace) -> None:
    """The options of :func:`_add_preprocessing_options`, checked."""
    if args.size < 8:
        raise UsageError(f"--size must be at least 8, got {args.size}")
    if len(args.mean) not in (1, 3) or len(args.std) not in (1, 3) or any(s <= 0 for s in args.std):
        raise UsageError("--mean and --std take 1 or 3 values (images are read as RGB), and --std values must be positive")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be positive, got {args.batch_size}")


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
    """The preset by name; a box rule (``epsilon-gamma-box``) bounded by the normalised black and white pixel."""
    if preset is None:
        return None
    from .rules import with_input_bounds

    centre, scale = torch.tensor(mean).reshape(-1, 1, 1), torch.tensor(std).reshape(-1, 1, 1)
    return with_input_bounds(preset, -centre / scale, (1 - centre) / scale)


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

    if args.text is not None:
        return _explain_text(args)
    if args.out is None:  # only images need it; text is printed
        args.parser.error("the following arguments are required: --out")
    if args.model.startswith(HF_PREFIX):
        raise UsageError("hf: models are explained with --text; images take torchvision:NAME, timm:NAME or file.py:factory")
    methods = _methods(args.method)
    requested = _target(args.target)
    _check_preprocessing(args)
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
# attribute and evaluate: a whole image folder, on one process or many (torchrun)
# ---------------------------------------------------------------------------
def _image_input(path: str, size: int, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """``explain``'s preprocessing of one file; a file it cannot read is skipped by the run, not fatal."""
    from .dataset import UnreadableExampleError

    try:
        return _preprocess(path, size, mean, std)[0]
    except UsageError as error:  # its message names the path; the run lists the file by its key
        cause = error.__cause__ or error
        raise UnreadableExampleError(f"{type(cause).__name__}: {_first_line(cause)}") from error


def _image_folder(data: str, size: int, mean: Sequence[float], std: Sequence[float]) -> Any:
    from .dataset import IMAGE_EXTENSIONS, ImageFiles

    if not os.path.isdir(data):
        raise UsageError(f"--data must be a folder of images, got {data}")
    files = ImageFiles(data, functools.partial(_image_input, size=size, mean=tuple(mean), std=tuple(std)))
    if not len(files):
        raise UsageError(f"no images in {data} or its subfolders (looked for {', '.join(IMAGE_EXTENSIONS)})")
    return files


def _model_on(device: torch.device, spec: str, weights: Optional[str], num_classes: Optional[int]) -> nn.Module:
    model = load_model(spec, num_classes)
    if weights:
        load_weights(model, weights)
    return model.to(device).eval()


def _checked_forward(model: nn.Module, size: int, inputs: Tensor) -> Tensor:
    try:
        with torch.no_grad():
            return model(inputs)
    except Exception as error:  # e.g. a model that needs another input size
        raise UsageError(
            f"the model failed on {size}x{size} images (see --size): {type(error).__name__}: {_first_line(error)}"
        ) from error


def _folder_explainers(args: argparse.Namespace, methods: Sequence[str], device: torch.device) -> Any:
    from .dataset import Explainers

    model = _model_on(device, args.model, args.weights, args.num_classes)
    built = _explainers(model, methods, _lrp_preset(args.preset, args.mean, args.std), args.layer)
    return Explainers(
        functools.partial(_checked_forward, model, args.size),
        {method: functools.partial(_attribute, method, built[method]) for method in methods},
    )


def _class_targets(requested: Optional[int], outputs: Any) -> Tensor:
    """The predicted class (``requested`` None) or ``requested``, checked against the model's outputs."""
    if not isinstance(outputs, Tensor) or outputs.dim() != 2:
        shape = tuple(outputs.shape) if isinstance(outputs, Tensor) else type(outputs).__name__
        raise UsageError(f"the model's output is {shape}; attribute needs a (batch, classes) tensor")
    classes = outputs.shape[1]
    if requested is not None and not 0 <= requested < classes:
        raise UsageError(f"target {requested} is out of range: the model has {classes} outputs (0..{classes - 1})")
    return outputs.argmax(1) if requested is None else torch.full((len(outputs),), requested, device=outputs.device)


def _absolute_spec(spec: str) -> str:
    """A file model's spec with an absolute path, so that ``evaluate`` finds it from anywhere."""
    kind, _, name = spec.rpartition(":")
    return spec if kind in ("torchvision", "timm") or not kind else f"{os.path.abspath(kind)}:{name}"


def _check_folder_run(args: argparse.Namespace) -> None:
    if args.workers < 0:
        raise UsageError(f"--workers must be 0 or more, got {args.workers}")
    if getattr(args, "shard_size", None) is not None and args.shard_size < 1:
        raise UsageError(f"--shard-size must be positive, got {args.shard_size}")
    if args.points < 1:
        raise UsageError(f"--points must be positive, got {args.points}")


def _attribute_folder(args: argparse.Namespace) -> int:
    from .dataset import attribute_dataset, process_group

    methods = _methods(args.method)
    requested = _target(args.target)
    _check_preprocessing(args)
    _check_folder_run(args)
    files = _image_folder(args.data, args.size, args.mean, args.std)
    metadata = {
        "model": _absolute_spec(args.model),
        "weights": os.path.abspath(args.weights) if args.weights else None,
        "num_classes": args.num_classes,
        "data": os.path.abspath(args.data),
        "size": args.size,
        "mean": list(args.mean),
        "std": list(args.std),
        "target": args.target,
        "preset": args.preset,
        "layer": args.layer,
    }
    with process_group(None if args.device == "auto" else args.device) as info:
        summary = attribute_dataset(
            functools.partial(_folder_explainers, args, methods),
            files,
            args.out,
            batch_size=args.batch_size,
            target=functools.partial(_class_targets, requested),
            resume=args.resume,
            shard_size=args.shard_size,
            device=info.device,
            num_workers=args.workers,
            metadata=metadata,
        )
        if info.rank == 0:
            _print_run(summary, files, "the predicted class" if requested is None else f"class {requested}")
        if args.evaluate:
            _evaluate_run(args, files, metadata, info.device, info.rank)
    return 0


def _print_run(summary: Any, files: Any, target_text: str) -> None:
    rate = summary.examples_now / summary.seconds if summary.seconds > 0 else 0.0
    processes = "1 process" if summary.world_size == 1 else f"{summary.world_size} processes"
    print(
        f"Went through {summary.examples_now} images ({', '.join(summary.methods)}; {target_text}) with {processes} "
        f"in {summary.seconds:.1f} s: {rate:.2f} images/s"
    )
    if summary.shards_before:
        print(f"  resumed: {summary.shards_before} shards were done before, {summary.shards_now} done now")
    if summary.failed:
        noun = "file" if len(summary.failed) == 1 else "files"
        print(f"Could not read {len(summary.failed)} {noun}; skipped, and listed under \"failed\" in {os.path.join(summary.out_dir, 'index.json')}:")
        for key, error in summary.failed.items():
            print(f"  {key}: {error}")
    if files.ignored:
        noun = "file" if len(files.ignored) == 1 else "files"
        print(f"Ignored {len(files.ignored)} {noun} without an image ending: {_listing(files.ignored)}")
    print(
        f"{summary.stored} of {summary.examples} images have attributions in {summary.out_dir}/ "
        f"({', '.join(m + '/' for m in summary.methods)}; one .npy per shard, index.json). Read them with "
        f"captum_graph.dataset.open_attributions({summary.out_dir!r}, {summary.methods[0]!r})"
    )


def _evaluate_run(args: argparse.Namespace, files: Any, metadata: Mapping[str, Any], device: torch.device, rank: int) -> None:
    from .dataset import evaluate_dataset

    evaluation = evaluate_dataset(
        functools.partial(_model_on, spec=metadata["model"], weights=metadata["weights"], num_classes=metadata["num_classes"]),
        files,
        args.out,
        batch_size=args.batch_size,
        points=args.points,
        resume=args.resume,
        device=device,
        num_workers=args.workers,
    )
    if rank == 0:
        print(
            f"Pixel flipping on {evaluation.examples} images: {evaluation.points} steps from none to all pixels set to 0 "
            "(after normalisation: the mean colour), the most relevant first. AOPC, higher is more faithful:"
        )
        scores = dict(evaluation.aopc)
        if evaluation.random_aopc is not None:
            scores["random order"] = evaluation.random_aopc
        width = max(len(name) for name in scores)
        for name, score in sorted(scores.items(), key=lambda item: -item[1]):
            print(f"  {name:<{width}}  {score:.4f}")
        print(f"Wrote {os.path.join(args.out, 'evaluation.json')}")


def _evaluate_folder(args: argparse.Namespace) -> int:
    from .dataset import process_group

    _check_folder_run(args)
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be positive, got {args.batch_size}")
    run_file = os.path.join(args.out, "run.json")
    if not os.path.isfile(run_file):
        raise UsageError(f"{args.out} holds no attribution run (no run.json); write one with captum-graph attribute")
    with open(run_file) as handle:
        metadata = json.load(handle).get("metadata") or {}
    if "model" not in metadata:
        raise UsageError(
            f"{args.out} was not written by captum-graph attribute (its run.json names no model); "
            "evaluate it with captum_graph.dataset.evaluate_dataset"
        )
    files = _image_folder(args.data or metadata["data"], metadata["size"], metadata["mean"], metadata["std"])
    with process_group(None if args.device == "auto" else args.device) as info:
        _evaluate_run(args, files, metadata, info.device, info.rank)
    return 0


# ---------------------------------------------------------------------------
# explain --text
# ---------------------------------------------------------------------------
def _text_model_at_example(folder: str) -> Tuple[nn.Module, Tuple[Tensor, ...]]:
    """The hf: model wrapped to take embeddings, and the embeddings of one example text to capture it at."""
    from .text import LogitsFromEmbeddings

    model, tokenizer = load_hf(folder)
    _require_inputs_embeds(model)
    with torch.no_grad():
        embeddings = model.get_input_embeddings()(tokenizer(["an example"], return_tensors="pt")["input_ids"])
    return LogitsFromEmbeddings(model), (embeddings,)


def _require_inputs_embeds(model: nn.Module) -> None:
    import inspect

    if "inputs_embeds" not in inspect.signature(model.forward).parameters:
        raise UsageError(
            f"{type(model).__name__} takes no inputs_embeds: --text explains text models "
            "(a ...ForSequenceClassification saved with save_pretrained)"
        )


def _text_methods(values: Optional[List[str]]) -> List[str]:
    from .text import TEXT_METHODS

    methods = _methods(values)
    for method in methods:
        if method not in TEXT_METHODS:
            raise UsageError(f"{method} explains images; for --text choose from {', '.join(TEXT_METHODS)}")
    return methods


def _class_names(model: nn.Module) -> str:
    """``0 = negative, 1 = positive`` from the model's config, or '' when it has only the default LABEL_i names."""
    names = getattr(getattr(model, "config", None), "id2label", None) or {}
    named = {int(i): name for i, name in names.items() if name != f"LABEL_{i}"}
    return ", ".join(f"{i} = {named[i]}" for i in sorted(named))


def _explain_text(args: argparse.Namespace) -> int:
    from .text import explain_texts, html_page, render_terminal, require_ipython, terminal_legend

    methods = _text_methods(args.method)
    requested = _target(args.target)
    if not args.model.startswith(HF_PREFIX):
        raise UsageError("--text needs a Hugging Face model saved with save_pretrained: hf:FOLDER (model and tokenizer)")
    if args.weights or args.num_classes is not None or args.layer:
        raise UsageError("--weights, --num-classes and --layer are for image models; an hf: folder holds its own weights")
    if not all(text.strip() for text in args.text):
        raise UsageError("--text got an empty text")
    if args.top < 0:
        raise UsageError(f"--top must be 0 or more, got {args.top}")
    out = None
    if args.out is not None:
        require_ipython()
        out = _output_dir(args.out)
    model, tokenizer = load_hf(args.model[len(HF_PREFIX) :])
    _require_inputs_embeds(model)
    longest = max(len(ids) for ids in tokenizer(args.text)["input_ids"])
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and longest > limit:
        raise UsageError(f"a text has {longest} tokens; the model takes at most {limit} (its max_position_embeddings)")
    try:
        with torch.no_grad():
            model(**tokenizer(args.text, padding=True, return_tensors="pt"))
    except Exception as error:  # e.g. a text longer than the model's position embeddings
        raise UsageError(f"the model failed on the texts: {type(error).__name__}: {_first_line(error)}") from error
    classes = _class_names(model)
    if classes:
        print(f"classes: {classes}")
    written = []
    for method in methods:
        results = explain_texts(model, tokenizer, args.text, target=requested, method=method, preset=args.preset)
        title = f"LRP ({args.preset})" if method == "lrp" and args.preset else METHOD_TITLES[method]
        for number, (text, result) in enumerate(zip(args.text, results), start=1):
            print(f"\n[{title}] text {number}: {text}")
            print(render_terminal(result, top=args.top, legend=False))
        if out is not None:
            path = os.path.join(out, f"text_{method}.html")
            with open(path, "w", encoding="utf-8") as page:
                page.write(html_page(results, title=f"{title}: relevance per token"))
            written.append(path)
    legend = terminal_legend()
    if legend:
        print(f"\n{legend}")
    if written:
        print(f"\nWrote {len(written)} HTML {'page' if len(written) == 1 else 'pages'} to {out}/")
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
  captum-graph explain hf:my_classifier/ --text "a wonderful day" --target 1
                                                      relevance per token of a save_pretrained folder
  torchrun --nproc-per-node 4 -m captum_graph attribute torchvision:resnet50 \\
      --data images/ --method lrp,gradcam --out attributions/ --evaluate
"""


def _floats(count_hint: str) -> Any:
    def parse(value: str) -> float:
        try:
            return float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{count_hint} must be numbers, got {value!r}") from None

    return parse


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """MODEL, --weights and --num-classes: the model to explain, as explain and attribute take it."""
    parser.add_argument("model", metavar="MODEL", help=MODEL_HELP + " (torchvision and timm models are built without weights)")
    parser.add_argument("--weights", metavar="FILE", help="state_dict to load (torch.load with weights_only=True)")
    parser.add_argument("--num-classes", type=int, default=None, metavar="N", help="build the model with N outputs, to fit --weights")


def _add_method_arguments(what: argparse._ArgumentGroup, preset_names: str, default_methods: str) -> None:
    """--method, --target, --preset and --layer: how explain and attribute explain."""
    what.add_argument(
        "--method", action="append", metavar="METHOD",
        help=f"lrp, gradcam or ixg (InputXGradient); repeat it or give a comma list (default: {default_methods})",
    )
    what.add_argument("--target", default="auto", help="class to explain: 'auto', the predicted class (default), or an index")
    what.add_argument(
        "--preset", default=None,
        help=f"LRP rule preset: {preset_names}; epsilon-gamma-box bounds the input by --mean/--std's normalised 0 and 1",
    )
    what.add_argument("--layer", default=None, help="Grad-CAM layer, a module or graph node name (default: chosen automatically)")


def _add_preprocessing_options(group: Any) -> None:
    """``--size``, ``--mean``, ``--std`` and ``--batch-size``, shared by ``explain`` and ``attribute``."""
    group.add_argument("--size", type=int, default=224, help="resize the short side to SIZE, then centre-crop SIZE x SIZE (default: 224)")
    group.add_argument("--mean", type=_floats("--mean"), nargs="+", default=list(IMAGENET_MEAN), metavar="M", help="normalisation mean per channel (default: ImageNet's, 0.485 0.456 0.406)")
    group.add_argument("--std", type=_floats("--std"), nargs="+", default=list(IMAGENET_STD), metavar="S", help="normalisation std per channel (default: ImageNet's, 0.229 0.224 0.225)")
    group.add_argument("--batch-size", type=int, default=8, metavar="N", help="images per forward pass (default: 8)")


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
        help="explain images (heatmap overlays) or texts (relevance per token) with LRP, Grad-CAM or InputXGradient",
        description="Images: load them, preprocess them (resize the short side, centre-crop, normalise), run the model "
        "and write one PNG per image and method, IMAGE_METHOD.png: the image next to the heatmap laid over it. "
        "Texts (--text, with an hf:FOLDER model saved by save_pretrained with its tokenizer): print the relevance of "
        "every token, coloured on a terminal (red for the class, blue against), and with --out write "
        "text_METHOD.html, Captum's visualize_text table.",
    )
    _add_model_arguments(explain)
    what = explain.add_argument_group("what to explain")
    inputs = what.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--image", nargs="+", action="extend", metavar="PATH", help="image files (repeatable)")
    inputs.add_argument("--text", nargs="+", action="extend", metavar="TEXT", help="texts, quoted (repeatable); needs an hf:FOLDER model")
    _add_method_arguments(what, preset_names, "lrp; text: lrp or ixg")
    _add_preprocessing_options(explain.add_argument_group("preprocessing"))
    output = explain.add_argument_group("output")
    output.add_argument("--out", metavar="DIR", help="output directory, created if needed (required for images; "
                        "with --text, where the HTML pages go)")
    output.add_argument("--top", type=int, default=3, metavar="K", help="with --text: list the K most relevant tokens of each text (default: 3)")
    explain.set_defaults(run=_explain, parser=explain)

    attribute = commands.add_parser(
        "attribute",
        help="explain every image of a folder with LRP, Grad-CAM or InputXGradient; one process or many (torchrun)",
        description="Explain every image under DIR (all subfolders; jpg, jpeg, png, bmp, gif, tif, tiff, webp), "
        "preprocessed as explain does, and write the attributions as numpy shards with an index to OUT: one folder per "
        "method. Run it as it is, or as `torchrun --nproc-per-node N -m captum_graph attribute ...` (any number of "
        "processes, CPUs or GPUs, one node or many): each image is explained by one process, and the results are "
        "the same. A file that cannot be read is skipped and listed. --resume continues a stopped run.",
    )
    _add_model_arguments(attribute)
    what = attribute.add_argument_group("what to explain")
    what.add_argument("--data", required=True, metavar="DIR", help="folder of images, read recursively")
    _add_method_arguments(what, preset_names, "lrp")
    _add_preprocessing_options(attribute.add_argument_group("preprocessing"))
    _add_folder_run_options(attribute, out_option=True)
    run = attribute.add_argument_group("the run")
    run.add_argument("--shard-size", type=int, default=None, metavar="N", help="images per shard file (default: the batch size)")
    run.add_argument("--evaluate", action="store_true", help="then measure pixel-flipping AOPC per method (as the evaluate command)")
    attribute.set_defaults(run=_attribute_folder)

    evaluate = commands.add_parser(
        "evaluate",
        help="pixel-flipping AOPC per method of the attributions an attribute run wrote",
        description="Delete each image's pixels, the most relevant first, and follow the explained class's output; "
        "AOPC (area over the perturbation curve) per method, next to deleting in random order. Model, weights, data "
        "and preprocessing are the attribute run's (recorded in OUT/run.json). Runs under torchrun as attribute does.",
    )
    evaluate.add_argument("out", metavar="OUT", help="the output directory of captum-graph attribute")
    evaluate.add_argument("--data", default=None, metavar="DIR", help="the image folder, if it moved since the attribute run")
    evaluate.add_argument("--batch-size", type=int, default=8, metavar="N", help="images per pixel-flipping call (default: 8)")
    _add_folder_run_options(evaluate, out_option=False)
    evaluate.set_defaults(run=_evaluate_folder)
    return parser


def _add_folder_run_options(parser: argparse.ArgumentParser, out_option: bool) -> None:
    """Options of ``attribute`` and ``evaluate``: output, resuming, workers, device, pixel-flipping steps."""
    group = parser.add_argument_group("output and processes")
    if out_option:
        group.add_argument("--out", required=True, metavar="OUT", help="output directory (shared by all processes), created if needed")
    group.add_argument("--resume", action="store_true", help="continue the run in OUT, skipping what is done")
    group.add_argument("--workers", type=int, default=0, metavar="N", help="data-loading processes per process (default: 0, read in the main process)")
    group.add_argument(
        "--device", default="auto", choices=["auto", "cpu", "cuda"],
        help="auto (default): cuda:LOCAL_RANK when CUDA is available, else cpu; cuda means cuda:LOCAL_RANK",
    )
    group.add_argument("--points", type=int, default=16, metavar="K", help="pixel-flipping steps from none to all pixels deleted (default: 16)")


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
