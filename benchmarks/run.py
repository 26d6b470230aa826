"""Speed and memory of captum_graph's LRP and Grad-CAM against Captum, zennit and InputXGradient.

For each model (torchvision, random weights, eval mode, float32, 224x224; and
Hugging Face's BERT-base and GPT-2 at their published sizes, random weights,
128 tokens, explained at their input embeddings) and batch size, times in this
process:

* ``InputXGradient`` (captum), the baseline: one forward and one plain backward;
* captum_graph ``LRP`` with the default rules, and with ``preset="epsilon-plus-flat"``
  and ``fold_batch_norm=True`` (the same composite and batch-norm merging as zennit's
  ``EpsilonPlusFlat`` with its canonizer), and on attention models with
  ``preset="attn-lrp"``;
* vanilla Captum ``LRP`` where it runs (on a copy of the model), with the largest
  difference from captum_graph's answer: equal on VGG, wrong wherever the forward
  has functional operations (ResNet's residual additions, DenseNet's
  concatenations);
* zennit ``EpsilonPlusFlat`` with the canonizer zennit 0.5 has for the model
  (optional: ``pip install -e '.[bench]'``);
* captum_graph ``LayerGradCam(model)`` (layer chosen from the graph) and Captum's
  ``LayerGradCam`` on the module whose output is that layer.

It prints median seconds and the ratio to InputXGradient, the peak extra memory
of one call (measured in a fresh subprocess, see benchmarks/README.md) and its
ratio to InputXGradient's, captum_graph's one-time graph preparation per model,
whether 100 repeated LRP calls grow resident memory, and how captum_graph's
attn-lrp compares with LXT's AttnLRP (``lxt_parity.py``). Run:

    .venv/bin/python benchmarks/run.py                 # everything (about 15 minutes on 2 cores)
    .venv/bin/python benchmarks/run.py --quick         # smoke run: small inputs, 2 models, about a minute
    .venv/bin/python benchmarks/run.py --markdown      # tables for README.md
"""
import argparse
import contextlib
import copy
import ctypes
import gc
import importlib
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torchvision

from captum_graph.text import LogitsFromEmbeddings

MODELS = ["resnet50", "vgg16", "densenet121", "efficientnet_b0", "vit_b_16", "bert-base", "gpt2"]
TARGET = 3
#: Hugging Face text models at their published sizes (random weights): (config, model class) in transformers.
TEXT_MODELS = {
    "bert-base": ("BertConfig", "BertForSequenceClassification"),  # hidden 768, 12 layers, 12 heads
    "gpt2": ("GPT2Config", "GPT2ForSequenceClassification"),  # GPT-2 small: hidden 768, 12 layers, 12 heads
}
#: Tokens per text (at most; ``--size`` below it shortens the texts too).
SEQUENCE_LENGTH = 128


class Unavailable(Exception):
    """A method that does not run on a model; the message is printed instead of a time."""


@dataclass
class Runner:
    """One method ready to run on one model and input: ``call()`` attributes once."""

    call: Callable[[], torch.Tensor]
    close: Callable[[], None] = lambda: None
    compare_with: Optional[str] = None  # the method whose answer this one should equal


# ---------------------------------------------------------------------------
# models and methods
# ---------------------------------------------------------------------------


def build_model(name: str, size: int) -> torch.nn.Module:
    """The torchvision model with random weights, in eval mode; a text model wrapped to take embeddings.

    Weight matrices that torchvision initialises to zero (ViT's classification head)
    are drawn at random instead, so that every method has a non-zero answer to compare.
    """
    torch.manual_seed(0)
    if name in TEXT_MODELS:
        import transformers

        config_class, model_class = TEXT_MODELS[name]
        config = getattr(transformers, config_class)(num_labels=TARGET + 1, pad_token_id=0)
        return LogitsFromEmbeddings(getattr(transformers, model_class)(config).eval())
    kwargs = {"image_size": size} if name.startswith("vit") else {}
    model = getattr(torchvision.models, name)(weights=None, **kwargs).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1 and not parameter.any():
                parameter.normal_(0, 0.02)
    return model


def _input(batch: int, size: int, model: Optional[torch.nn.Module] = None) -> torch.Tensor:
    """Images, or for a text model the embeddings of random tokens (``SEQUENCE_LENGTH`` of them)."""
    generator = torch.Generator().manual_seed(1)
    if isinstance(model, LogitsFromEmbeddings):
        embedding = model.model.get_input_embeddings()
        ids = torch.randint(1, embedding.num_embeddings, (batch, min(size, SEQUENCE_LENGTH)), generator=generator)
        return embedding(ids).detach()
    return torch.randn(batch, 3, size, size, generator=generator)


def _image_only(name: str) -> None:
    if name in TEXT_MODELS:
        raise Unavailable("n/a: for image models")


def _input_x_gradient(model, x, name):
    from captum.attr import InputXGradient

    method = InputXGradient(model)
    return Runner(lambda: method.attribute(x, target=TARGET))


def _graph_lrp(model, x, name):
    from captum_graph.attr import LRP

    method = LRP(model)
    method.attribute(x[:1], target=TARGET)  # captures the graph, once for every batch size
    return Runner(lambda: method.attribute(x, target=TARGET))


def _graph_lrp_attn_lrp(model, x, name):
    from captum_graph.attr import LRP

    if not (name in TEXT_MODELS or name.startswith("vit")):
        raise Unavailable("n/a: no attention (the same rules as captum_graph LRP)")
    method = LRP(model, preset="attn-lrp")
    method.attribute(x[:1], target=TARGET)  # captures the graph, once for every batch size
    return Runner(lambda: method.attribute(x, target=TARGET))


def _graph_lrp_epsilon_plus_flat(model, x, name):
    from captum_graph.attr import LRP

    _image_only(name)
    method = LRP(model, preset="epsilon-plus-flat", fold_batch_norm=True)
    method.attribute(x[:1], target=TARGET)  # captures the graph, once for every batch size
    return Runner(lambda: method.attribute(x, target=TARGET))


def _captum_lrp(model, x, name):
    from captum.attr import LRP

    method = LRP(copy.deepcopy(model))  # Captum sets rules and hooks on the model it is given
    try:
        method.attribute(x[:1], target=TARGET)  # does it run at all?
    except Exception as failure:
        raise Unavailable(f"fails: {type(failure).__name__}: {_first_line(failure)}") from None
    return Runner(lambda: method.attribute(x, target=TARGET), compare_with="captum_graph LRP")


def _zennit_canonizers(name: str) -> list:
    from zennit.canonizers import SequentialMergeBatchNorm
    from zennit.torchvision import ResNetCanonizer, VGGCanonizer

    if name.startswith("resnet"):
        return [ResNetCanonizer()]
    if name.startswith("vgg"):
        return [VGGCanonizer()]
    if name.startswith("vit"):
        return []  # no batch norm, and zennit 0.5 has no canonizer for attention
    return [SequentialMergeBatchNorm()]  # zennit 0.5 has none specific to DenseNet or EfficientNet


def _zennit(model, x, name):
    _image_only(name)
    try:
        from zennit.attribution import Gradient
        from zennit.composites import EpsilonPlusFlat
    except ImportError:
        raise Unavailable("not installed (pip install -e '.[bench]')") from None
    attributor = Gradient(copy.deepcopy(model), EpsilonPlusFlat(canonizers=_zennit_canonizers(name)))
    # The composite and canonizers stay registered between calls (zennit's best case):
    # only the attribution itself is timed.
    try:
        attributor.__enter__()
    except Exception as failure:  # e.g. a canonizer that misreads the model
        raise Unavailable(f"fails: {type(failure).__name__}: {_first_line(failure)}") from None
    with torch.no_grad():
        logits = model(x[:1])
    one_hot = torch.zeros(x.shape[0], logits.shape[1])
    one_hot[:, TARGET] = 1

    def call():
        return attributor(x, one_hot)[1]

    try:
        attributor(x[:1], one_hot[:1])  # does it run at all?
    except Exception as failure:
        attributor.__exit__(None, None, None)
        raise Unavailable(f"fails: {type(failure).__name__}: {_first_line(failure)}") from None
    return Runner(call, close=lambda: attributor.__exit__(None, None, None))


def _graph_grad_cam(model, x, name):
    from captum_graph.attr import LayerGradCam

    _image_only(name)
    method = LayerGradCam(model)
    method.attribute(x[:1], target=TARGET)  # captures the graph, once for every batch size
    return Runner(lambda: method.attribute(x, target=TARGET))


def _captum_grad_cam(model, x, name):
    from captum.attr import LayerGradCam

    _image_only(name)
    layer = captum_layer_for_auto_cam(model, x)
    method = LayerGradCam(model, model.get_submodule(layer))
    return Runner(lambda: method.attribute(x, target=TARGET))


def captum_layer_for_auto_cam(model: torch.nn.Module, x: torch.Tensor) -> str:
    """The module of ``model`` whose output is the layer ``LayerGradCam(model)`` chooses at ``x``."""
    from captum_graph.attr._layer import tapped_graph
    from captum_graph.errors import LayerResolutionError
    from captum_graph.layers import resolve_layer
    from captum_graph.modules import TokensToGrid
    from captum_graph.prepare import prepare

    _, tap, node = tapped_graph(model, None, x)
    layer_name = node.meta.get("qualname", node.name)
    if isinstance(tap, TokensToGrid):
        raise Unavailable(f"n/a: '{layer_name}' is a token layer; Captum has no spatial map there")
    prepared = prepare(model, (x,))
    modules = dict(model.named_modules())
    parts = layer_name.split(".")
    for end in range(len(parts), 0, -1):  # the smallest module whose output is the node
        prefix = ".".join(parts[:end])
        if prefix in modules:
            try:
                if resolve_layer(model, prepared, prefix) is node:
                    return prefix
            except LayerResolutionError:
                continue  # a module called at several places
    raise Unavailable(f"n/a: no module's output is '{layer_name}'")


METHODS: Dict[str, Callable] = {
    "InputXGradient": _input_x_gradient,
    "captum_graph LRP": _graph_lrp,
    "captum_graph LRP epsilon-plus-flat": _graph_lrp_epsilon_plus_flat,
    "captum_graph LRP attn-lrp": _graph_lrp_attn_lrp,
    "Captum LRP": _captum_lrp,
    "zennit EpsilonPlusFlat": _zennit,
    "captum_graph LayerGradCam (auto)": _graph_grad_cam,
    "Captum LayerGradCam (same layer)": _captum_grad_cam,
}
BASELINE = "InputXGradient"


def _first_line(failure: Exception) -> str:
    text = str(failure).strip().splitlines()
    return text[0][:90] if text else ""


# ---------------------------------------------------------------------------
# measurements
# ---------------------------------------------------------------------------
@dataclass
class Row:
    model: str
    batch: int
    method: str
    seconds: Optional[float] = None
    note: str = ""
    memory_mb: Optional[float] = None
    times: List[float] = field(default_factory=list)


def time_method(runner: Runner, repeats: int) -> Tuple[List[float], torch.Tensor]:
    """Seconds of ``repeats`` calls after one warm-up call, and the last answer."""
    answer = runner.call()
    times = []
    for _ in range(repeats):
        del answer  # not held while the next call runs
        start = time.perf_counter()
        answer = runner.call()
        times.append(time.perf_counter() - start)
    return times, answer


def _relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def measure_times(name: str, batch: int, size: int, repeats: int, methods: List[str]) -> List[Row]:
    model = build_model(name, size)
    x = _input(batch, size, model)
    rows, answers = [], {}
    for method in methods:
        row = Row(name, batch, method)
        rows.append(row)
        try:
            runner = METHODS[method](model, x, name)
        except Unavailable as reason:
            row.note = str(reason)
            continue
        except Exception as failure:
            row.note = f"fails: {type(failure).__name__}: {_first_line(failure)}"
            continue
        try:
            row.times, answer = time_method(runner, repeats)
            row.seconds = statistics.median(row.times)
            answers[method] = answer.detach()
            del answer
            if runner.compare_with and answers.get(runner.compare_with) is not None:
                difference = _relative_difference(answers[method], answers[runner.compare_with])
                same = "same answer" if difference < 1e-3 else "WRONG answer"
                row.note = f"{same}: max difference {difference:.1e} of max relevance vs {runner.compare_with}"
        except Exception as failure:
            row.note = f"fails: {type(failure).__name__}: {_first_line(failure)}"
        finally:
            runner.close()
        print(f"  {name} batch {batch} {method}: {_seconds(row.seconds)} {row.note}", file=sys.stderr, flush=True)
    return rows


def measure_preparation(name: str, size: int, repeats: int) -> dict:
    """captum_graph's one-time cost: capture and rewrite (cache cleared), next to a plain
    ``torch.export`` of the same model with the same dynamic batch, and what a cached call pays."""
    from captum_graph.attr import LRP

    prepare_module = importlib.import_module("captum_graph.prepare")  # the package exports the function

    model = build_model(name, size)
    x = _input(2, size, model)
    exports, colds = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim.AUTO},), strict=False)
        exports.append(time.perf_counter() - start)
        prepare_module._CACHE.pop(model, None)
        start = time.perf_counter()
        prepare_module.prepare(model, (x,))
        colds.append(time.perf_counter() - start)
    hits = []
    for _ in range(20):
        start = time.perf_counter()
        prepare_module.prepare(model, (x,))
        hits.append(time.perf_counter() - start)
    prepare_module._CACHE.pop(model, None)
    lrp = LRP(model)
    start = time.perf_counter()
    lrp.attribute(x, target=TARGET)
    first = time.perf_counter() - start
    later = statistics.median(time_method(Runner(lambda: lrp.attribute(x, target=TARGET)), repeats)[0])
    return {
        "model": name,
        "export_s": statistics.median(exports),
        "prepare_s": statistics.median(colds),
        "cached_ms": statistics.median(hits) * 1e3,
        "first_minus_later_s": first - later,
        "later_s": later,
    }


def _probe_command(kind: str, *args: str) -> List[str]:
    return [sys.executable, os.path.abspath(__file__), "--probe", kind, *args]


def _run_probe(kind: str, *args: str) -> dict:
    """Run one measurement in a fresh interpreter (see ``probe``); its last line is JSON."""
    env = dict(os.environ, **_PROBE_MALLOC)
    done = subprocess.run(_probe_command(kind, *args), env=env, capture_output=True, text=True)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        return {"error": (done.stderr.strip().splitlines() or ["probe failed"])[-1][:120]}
    return json.loads(lines[-1])


# glibc: serve every allocation of 64 KiB or more with its own mmap and return it to the
# system when freed, so that resident memory follows the live tensors (no cached free heap).
_PROBE_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "MALLOC_ARENA_MAX": "2"}


def _status_kib(field_name: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field_name} in /proc/self/status")


def _release_free_memory() -> None:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _reset_peak() -> bool:
    """Reset VmHWM to the current resident size (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
        return True
    except OSError:
        return False


def probe_memory(name: str, batch: int, size: int, method: str) -> dict:
    """Peak resident memory of one call above the resident memory just before it, in MiB.

    The method is built first (captum_graph prepares its graph there, zennit registers
    its composite and merges batch norms, Captum LRP and zennit make a first call to
    see whether they run at all, on a batch of one), then the peak is reset and one
    call measured.
    """
    torch.set_num_threads(_THREADS)
    model = build_model(name, size)
    x = _input(batch, size, model)
    try:
        runner = METHODS[method](model, x, name)
    except Exception as failure:
        return {"error": f"{type(failure).__name__}: {_first_line(failure)}"}
    _release_free_memory()
    before = _status_kib("VmRSS")
    if not _reset_peak():
        return {"error": "cannot reset the peak resident size (/proc/self/clear_refs)"}
    result = runner.call()
    peak = _status_kib("VmHWM")
    del result
    return {"extra_mib": (peak - before) / 1024}


def probe_growth(size: int = 64, batch: int = 2) -> dict:
    """Resident memory and live tensors after 10 and after 100 LRP calls on resnet18."""
    from captum_graph.attr import LRP

    torch.set_num_threads(_THREADS)
    model = torchvision.models.resnet18(weights=None).eval()
    x = _input(batch, size)
    lrp = LRP(model)
    counts = {}
    for calls in range(1, 101):
        lrp.attribute(x, target=TARGET)
        if calls in (10, 100):
            _release_free_memory()
            tensors = sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))
            counts[calls] = (_status_kib("VmRSS") / 1024, tensors)
    return {"rss_10": counts[10][0], "rss_100": counts[100][0], "tensors_10": counts[10][1], "tensors_100": counts[100][1]}


def compare_with_lxt() -> List[dict]:
    """captum_graph's attn-lrp next to LXT's AttnLRP rules (``lxt_parity.py``, one subprocess each):
    a small LLaMA in float64 (how close), and one of GPT-2's size in float32 (how fast)."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lxt_parity.py")
    runs = [
        [],
        ["--hidden", "768", "--layers", "12", "--heads", "12", "--batch", "8", "--sequence", str(SEQUENCE_LENGTH),
         "--dtype", "float32", "--repeats", "2"],
    ]
    results = []
    for extra in runs:
        command = [sys.executable, script, *extra, "--threads", str(_THREADS)]
        done = subprocess.run(command, capture_output=True, text=True)
        lines = done.stdout.strip().splitlines()
        if done.returncode != 0 or not lines:
            results.append({"error": (done.stderr.strip().splitlines() or ["failed"])[-1][:160]})
        else:
            results.append(json.loads(lines[-1]))
        print(f"  LXT comparison: {results[-1]}", file=sys.stderr, flush=True)
    return results


# ---------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------
def _seconds(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.3f}" if value < 10 else f"{value:.1f}"


def machine_line() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as info:
            cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), cpu)
    versions = [f"torch {torch.__version__}", f"torchvision {torchvision.__version__}"]
    for package in ("captum", "zennit", "transformers", "lxt"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions.append(f"{package} {importlib.metadata.version(package)}")
    return f"{cpu}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads; " + ", ".join(versions)


def print_results(
    rows: List[Row], preparations: List[dict], growth: Optional[dict], markdown: bool, size: int, lxt: List[dict] = ()
) -> None:
    baseline = {(r.model, r.batch): r for r in rows if r.method == BASELINE}
    print(f"Machine: {machine_line()}")
    print(f"Inputs: {size}x{size}, float32, random weights (weights=None), eval mode; target class {TARGET}.")
    if any(r.model in TEXT_MODELS for r in rows):
        print(
            f"Text models: the embeddings of {min(size, SEQUENCE_LENGTH)} random tokens per text, explained through "
            "model(inputs_embeds=...).logits; random weights at the published configuration."
        )
    print()
    header = ["model", "batch", "method", "median s", "× IxG time", "peak extra MiB", "× IxG memory", "note"]
    table = []
    for row in rows:
        base = baseline.get((row.model, row.batch))
        ratio = row.seconds / base.seconds if row.seconds and base and base.seconds else None
        memory_ratio = (
            row.memory_mb / base.memory_mb if row.memory_mb is not None and base and base.memory_mb else None
        )
        table.append([
            row.model, str(row.batch), row.method, _seconds(row.seconds),
            "-" if ratio is None else f"{ratio:.2f}",
            "-" if row.memory_mb is None else f"{row.memory_mb:.0f}",
            "-" if memory_ratio is None else f"{memory_ratio:.2f}",
            row.note,
        ])
    _print_table(header, table, markdown)
    if preparations:
        print("\ncaptum_graph's one-time graph preparation (capture + rewrite) and what later calls pay:\n")
        header = [
            "model", "plain torch.export (s)", "prepare(), cache cleared (s)", "prepare(), cached (ms)",
            "first LRP call − later call (s)",
        ]
        _print_table(header, [
            [p["model"], f"{p['export_s']:.3f}", f"{p['prepare_s']:.3f}", f"{p['cached_ms']:.2f}", f"{p['first_minus_later_s']:.3f}"]
            for p in preparations
        ], markdown)
    if lxt:
        print("\nAttnLRP: captum_graph's attn-lrp preset next to LXT's rules (benchmarks/lxt_parity.py, a random LLaMA):\n")
        header = ["configuration", "max difference / max relevance", "captum_graph s", "LXT s", "note"]
        table = []
        for result in lxt:
            if "error" in result:
                table.append(["-", "-", "-", "-", f"fails: {result['error']}"])
                continue
            c = result["config"]
            table.append([
                f"hidden {c['hidden']}, {c['layers']} layers, batch {c['batch']} x {c['sequence']} tokens, "
                f"{c['dtype'].split('.')[-1]}, {c.get('threads', '?')} threads",
                f"{result['max_difference_of_max_relevance']:.1e}",
                f"{result['captum_graph_seconds']:.3f}", f"{result['lxt_seconds']:.3f}",
                "LXT's RMSNorm computes in float32" if "64" in c["dtype"] else "",
            ])
        _print_table(header, table, markdown)
    if growth:
        if "error" in growth:
            print(f"\nMemory growth check failed: {growth['error']}")
        else:
            print(
                f"\nMemory growth (resnet18, batch 2, 64x64, captum_graph LRP): resident "
                f"{growth['rss_10']:.0f} MiB after 10 calls, {growth['rss_100']:.0f} MiB after 100 "
                f"({growth['rss_100'] - growth['rss_10']:+.1f} MiB); live tensors "
                f"{growth['tensors_10']} and {growth['tensors_100']}."
            )


def _print_table(header: List[str], table: List[List[str]], markdown: bool) -> None:
    if markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for cells in table:
            print("| " + " | ".join(cells) + " |")
        return
    widths = [max(len(h), *(len(c[i]) for c in table)) if table else len(h) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for cells in table:
        print("  ".join(c.ljust(w) for c, w in zip(cells, widths)))


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------
_THREADS = torch.get_num_threads()


def main() -> None:
    global _THREADS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=None, help=f"default: {' '.join(MODELS)}")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=None, help="default: 1 8")
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed calls after one warm-up (default: 3 at batch 1, else 2)"
    )
    parser.add_argument("--size", type=int, default=None, help="input height and width (default 224)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), metavar="METHOD")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument(
        "--memory-batch-sizes", nargs="*", type=int, default=None,
        help="batch sizes whose memory is measured, one subprocess per method (default: the largest)",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    parser.add_argument("--no-lxt", action="store_true", help="skip the comparison with LXT's AttnLRP")
    parser.add_argument(
        "--quick", action="store_true",
        help="smoke run: 64x64, resnet50 and vit_b_16, batch 2, memory of the baseline and captum_graph LRP only",
    )
    parser.add_argument("--markdown", action="store_true", help="print markdown tables (for README.md)")
    parser.add_argument("--probe", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    _THREADS = torch.get_num_threads()

    if args.probe:  # a child process: one measurement, printed as JSON
        kind, *rest = args.probe
        if args.threads is None and os.environ.get("CAPTUM_GRAPH_BENCH_THREADS"):
            _THREADS = int(os.environ["CAPTUM_GRAPH_BENCH_THREADS"])
        if kind == "memory":
            name, batch, size, method = rest
            print(json.dumps(probe_memory(name, int(batch), int(size), method)))
        else:
            print(json.dumps(probe_growth()))
        return

    os.environ["CAPTUM_GRAPH_BENCH_THREADS"] = str(_THREADS)
    models = args.models or (["resnet50", "vit_b_16"] if args.quick else MODELS)
    batches = args.batch_sizes or ([2] if args.quick else [1, 8])
    size = args.size or (64 if args.quick else 224)
    memory_batches = [] if args.no_memory else (
        args.memory_batch_sizes if args.memory_batch_sizes is not None else [max(batches)]
    )
    memory_methods = [BASELINE, "captum_graph LRP"] if args.quick else list(METHODS)
    rows: List[Row] = []
    preparations = []
    for name in models:
        print(f"{name}:", file=sys.stderr, flush=True)
        text = name in TEXT_MODELS  # batch 8 only (what they are measured for), one cold preparation
        preparations.append(measure_preparation(name, size, args.repeats or (1 if text else 3)))
        for batch in [b for b in batches if not text or b == max(batches)]:
            repeats = args.repeats or (3 if batch == 1 else 2)
            batch_rows = measure_times(name, batch, size, repeats, args.methods)
            if batch in memory_batches:
                for row in batch_rows:
                    if row.seconds is None or row.method not in memory_methods:
                        continue
                    found = _run_probe("memory", name, str(batch), str(size), row.method)
                    row.memory_mb = found.get("extra_mib")
                    print(f"  {name} batch {batch} {row.method}: {row.memory_mb} MiB", file=sys.stderr, flush=True)
                    if "error" in found:
                        row.note = (row.note + "; " if row.note else "") + f"memory: {found['error']}"
            rows += batch_rows
    growth = _run_probe("growth") if memory_batches else None
    lxt = [] if args.quick or args.no_lxt else compare_with_lxt()
    print_results(rows, preparations, growth, args.markdown, size, lxt)


if __name__ == "__main__":
    main()
