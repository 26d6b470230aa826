"""Dataset-scale attribution: many processes with torch.distributed, shards on disk, resumable.

Run a script that calls :func:`attribute_dataset` as it is (one process), or
under ``torchrun`` (one process per CPU share or GPU, on one node or many): the
process group is set up from torchrun's environment, ``gloo`` on CPUs and
``nccl`` on GPUs, and each example is explained by exactly one process::

    from captum_graph.attr import LRP, LayerGradCam
    from captum_graph.dataset import attribute_dataset, open_attributions

    def explainers(device):                      # called once in every process
        model = build_model().to(device).eval()
        return {"lrp": LRP(model), "gradcam": LayerGradCam(model)}

    attribute_dataset(explainers, dataset, "out/", batch_size=32, target=lambda logits: logits.argmax(1))
    relevance = open_attributions("out/", "lrp")  # lazy: {key: numpy array}

How the work is split. The dataset's indices are cut into shards of
``shard_size`` consecutive examples (the last one may be shorter). The shards
still to do are dealt out in turn to the processes, so no example is done twice
and none is padded in (``DistributedSampler`` repeats examples to even out the
processes' shares). A shard is explained in
batches of ``batch_size`` and then written. Its shards and batches do not
depend on the number of processes, so with the same number of threads per
process the arrays are the same bit for bit on one process or many.

What is written to ``out_dir`` (on a file system every process sees)::

    run.json                  the run's settings: methods, examples, shard size, digest of the keys
    keys.json                 every example's key, in dataset order
    <method>/<shard>.npy      one array per method and shard, (rows, *attribution shape)
    shards/<shard>.json       the shard's record: keys and dataset indices of its rows, targets,
                              examples that could not be read; written last, so a shard is done
                              exactly when its record exists
    index.json                all records in one file, written when a run ends
    runs/<run>/rank<r>.json   which shards each process did, and when
    evaluation/<shard>.json   pixel-flipping results per shard (:func:`evaluate_dataset`)
    evaluation.json           AOPC per method over the dataset

Every file is written to a temporary name and renamed, so a killed run leaves
whole files or none. ``resume=True`` continues a run: the shards whose record
exists are skipped, the others are done again from the start.

Each method's results stay in a folder of their own: ``lrp/`` holds
``(rows, C, H, W)`` relevance of the input, ``gradcam/`` Grad-CAM's
``(rows, 1, h, w)`` map at its layer's resolution, ``ixg/`` Input x Gradient.
"""
import collections
import contextlib
import functools
import hashlib
import json
import os
import re
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import (
    Any,
    Callable,
    Dict,
    Iterator,
    List,
    Mapping,
    NamedTuple,
    Optional,
    Sequence,
    Tuple,
    Type,
    Union,
)

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from .errors import CaptumGraphError

__all__ = [
    "attribute_dataset",
    "evaluate_dataset",
    "open_attributions",
    "process_group",
    "Explainers",
    "ImageFiles",
    "AttributionStore",
    "RunSummary",
    "EvaluationSummary",
    "ProcessInfo",
    "DatasetRunError",
    "UnreadableExampleError",
    "IMAGE_EXTENSIONS",
    "FROM_DATASET",
]

#: File name endings :class:`ImageFiles` reads (compared in lower case).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
#: ``target=FROM_DATASET``: each dataset item is ``(input, target)`` and its target is explained.
FROM_DATASET = "dataset"

_FORMAT = 1
_SHARD_NAME = re.compile(r"^(\d{8})\.json$")
_TEMP_MARK = ".tmp-"
_RESERVED_NAMES = {"shards", "runs", "evaluation"}
_METHOD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

Explain = Callable[[Tensor, Optional[Tensor]], Tensor]
Target = Union[None, int, str, Callable[[Tensor], Any]]


class DatasetRunError(CaptumGraphError, ValueError):
    """A dataset run cannot start or go on: its output directory, settings or dataset do not fit."""


class UnreadableExampleError(CaptumGraphError, OSError):
    """An example could not be read (e.g. a broken image file); the run skips it and lists it."""


# ---------------------------------------------------------------------------
# processes
# ---------------------------------------------------------------------------
class ProcessInfo(NamedTuple):
    """Where this process stands: its ``rank`` among ``world_size`` processes, and its ``device``."""

    rank: int
    world_size: int
    device: torch.device


def _device(device: Union[None, str, torch.device]) -> torch.device:
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", local_rank)
    return device


@contextlib.contextmanager
def process_group(device: Union[None, str, torch.device] = None) -> Iterator[ProcessInfo]:
    """Join torchrun's process group for the block, if there is one to join.

    Under ``torchrun`` with more than one process and no process group yet, one
    is started from torchrun's environment: ``gloo`` for CPU work, and for
    GPUs ``nccl`` with ``gloo`` beside it for the small Python objects the
    processes exchange. It is destroyed when the block ends. A process group
    the caller started is used as it is and left alone; without torchrun the
    block runs as one process.

    Args:
        device: this process's device; default ``cuda:LOCAL_RANK`` when CUDA
            is available, else the CPU. ``"cuda"`` means ``cuda:LOCAL_RANK``.

    Yields:
        :class:`ProcessInfo`.
    """
    device = _device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    started = False
    if dist.is_available() and not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group(backend="cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo")
        started = True
    try:
        if dist.is_available() and dist.is_initialized():
            yield ProcessInfo(dist.get_rank(), dist.get_world_size(), device)
        else:
            yield ProcessInfo(0, 1, device)
    finally:
        if started:
            dist.destroy_process_group()


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _broadcast(value: Any) -> Any:
    """Rank 0's ``value`` on every process."""
    if not _distributed():
        return value
    box = [value if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _all_gather(value: Any) -> List[Any]:
    if not _distributed():
        return [value]
    gathered: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def _on_rank_zero(info: ProcessInfo, work: Callable[[], Any]) -> Any:
    """Run ``work`` on rank 0 and hand its result to every process; its error is raised on all of them."""
    outcome: Tuple[str, Any] = ("ok", None)
    error: Optional[BaseException] = None
    if info.rank == 0:
        try:
            outcome = ("ok", work())
        except Exception as caught:  # re-raised below on rank 0; the others raise its message
            error = caught
            outcome = ("error", f"{type(caught).__name__}: {caught}")
    outcome = _broadcast(outcome)
    if error is not None:
        raise error
    if outcome[0] == "error":
        raise DatasetRunError(f"rank 0 stopped the run: {outcome[1]}")
    return outcome[1]


# ---------------------------------------------------------------------------
# explainers and targets
# ---------------------------------------------------------------------------
class Explainers(NamedTuple):
    """What an explainer factory may return when its methods are plain functions.

    Attributes:
        model: the forward function a callable ``target`` is applied to (the
            model); may be ``None`` when the target is not a callable.
        methods: method name -> a Captum attribution object (called as
            ``attribute(inputs, target=targets)``) or a function
            ``explain(inputs, targets) -> Tensor``. Each name becomes a folder.
    """

    model: Optional[Callable[[Tensor], Tensor]]
    methods: Mapping[str, Any]


def _as_explainers(built: Any) -> Explainers:
    if isinstance(built, Explainers):
        methods, model = dict(built.methods), built.model
    elif isinstance(built, Mapping):
        methods, model = dict(built), None
    elif hasattr(built, "attribute"):
        methods, model = {"attribution": built}, None
    else:
        raise DatasetRunError(
            f"the explainer factory returned {type(built).__name__}; return a Captum attribution object, a dict "
            "{method name: attribution object or function(inputs, targets)}, or captum_graph.dataset.Explainers"
        )
    if not methods:
        raise DatasetRunError("the explainer factory returned no methods")
    for name, method in methods.items():
        if not isinstance(name, str) or not _METHOD_NAME.match(name) or name in _RESERVED_NAMES:
            raise DatasetRunError(
                f"method name {name!r} cannot name a folder: use letters, digits, '_', '.' and '-', "
                f"and none of {sorted(_RESERVED_NAMES)}"
            )
        if not hasattr(method, "attribute") and not callable(method):
            raise DatasetRunError(f"method {name!r} is a {type(method).__name__}, neither an attribution object nor a function")
    if model is None:
        model = next((m.forward_func for m in methods.values() if callable(getattr(m, "forward_func", None))), None)
    return Explainers(model, methods)


def _explain(method: Any, inputs: Tensor, targets: Optional[Tensor]) -> Tensor:
    if hasattr(method, "attribute"):
        # Inputs that already require gradients spare Captum's "did not already require gradients" warning.
        result = method.attribute(inputs.detach().requires_grad_(), target=targets)
    else:
        result = method(inputs, targets)
    if not isinstance(result, Tensor) or result.dim() == 0 or result.shape[0] != len(inputs):
        shape = tuple(result.shape) if isinstance(result, Tensor) else type(result).__name__
        raise DatasetRunError(f"an explainer returned {shape} for a batch of {len(inputs)}; it must return one row per input")
    return result.detach()


def _targets(target: Target, explainers: Explainers, inputs: Tensor, from_items: Sequence[Any]) -> Optional[Tensor]:
    if target is None:
        return None
    if isinstance(target, str):
        if target != FROM_DATASET:
            raise DatasetRunError(f"target must be None, an int, a callable or {FROM_DATASET!r}, got {target!r}")
        if any(t is None for t in from_items):
            raise DatasetRunError(f"target={FROM_DATASET!r} needs dataset items of the form (input, target)")
        return torch.as_tensor([int(t) for t in from_items], dtype=torch.long, device=inputs.device)
    if isinstance(target, int) and not isinstance(target, bool):
        return torch.full((len(inputs),), target, dtype=torch.long, device=inputs.device)
    if callable(target):
        if explainers.model is None:
            raise DatasetRunError(
                "a callable target needs the model's output, and no method has a forward_func: "
                "return captum_graph.dataset.Explainers(model, methods) from the factory"
            )
        with torch.no_grad():
            chosen = torch.as_tensor(target(explainers.model(inputs)), device=inputs.device)
        if chosen.shape != (len(inputs),) or chosen.is_floating_point():
            raise DatasetRunError(f"the target function returned {tuple(chosen.shape)} {chosen.dtype}; it must return one class index per input")
        return chosen.long()
    raise DatasetRunError(f"target must be None, an int, a callable or {FROM_DATASET!r}, got {type(target).__name__}")


# ---------------------------------------------------------------------------
# datasets
# ---------------------------------------------------------------------------
class ImageFiles(torch.utils.data.Dataset):
    """The image files under ``root``, in every subfolder, sorted by path; each loaded by ``load(path)``.

    A file counts as an image by its name's ending (:data:`IMAGE_EXTENSIONS`,
    any case); other files are listed in :attr:`ignored`. A file ``load``
    cannot read raises :class:`UnreadableExampleError`, which
    :func:`attribute_dataset` skips and lists.

    Args:
        root: the folder.
        load: path -> input tensor, e.g. read, resize, normalise. Images of
            different sizes must come out the same size to share a batch.

    Attributes:
        keys: each image's path relative to ``root``, with ``/`` separators.
        paths: the full paths.
        ignored: relative paths of the files that are not images.
    """

    def __init__(self, root: str, load: Callable[[str], Tensor]) -> None:
        if not os.path.isdir(root):
            raise DatasetRunError(f"image folder not found: {root}")
        self.root, self.load = root, load
        self.keys: List[str] = []
        self.ignored: List[str] = []
        for folder, subfolders, files in os.walk(root):
            subfolders.sort()
            for name in files:
                relative = os.path.relpath(os.path.join(folder, name), root).replace(os.sep, "/")
                (self.keys if name.lower().endswith(IMAGE_EXTENSIONS) else self.ignored).append(relative)
        self.keys.sort()
        self.ignored.sort()
        self.paths = [os.path.join(root, *key.split("/")) for key in self.keys]

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> Tensor:
        try:
            return self.load(self.paths[index])
        except UnreadableExampleError:
            raise
        except (OSError, ValueError, SyntaxError, _decompression_bomb()) as error:  # what PIL raises for bad files
            raise UnreadableExampleError(f"{type(error).__name__}: {error}") from error


def _decompression_bomb() -> Type[Exception]:
    try:
        from PIL import Image
    except ImportError:
        return OSError
    return Image.DecompressionBombError


def _dataset_keys(dataset: Any, keys: Optional[Sequence[str]]) -> List[str]:
    if keys is None:
        found = getattr(dataset, "keys", None)
        keys = found if found is not None and not callable(found) else [str(i) for i in range(len(dataset))]
    keys = [str(key) for key in keys]
    if len(keys) != len(dataset):
        raise DatasetRunError(f"{len(keys)} keys for a dataset of {len(dataset)} examples")
    repeated = [key for key, count in collections.Counter(keys).items() if count > 1]
    if repeated:
        raise DatasetRunError(f"keys must be unique; repeated: {repeated[:5]}")
    return keys


def _digest(keys: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(list(keys)).encode()).hexdigest()


class _Item(NamedTuple):
    index: int
    input: Optional[Tensor]
    target: Any
    error: Optional[str]


class _SafeItems(torch.utils.data.Dataset):
    """Items as :class:`_Item`; an item whose reading raises one of ``skip`` becomes an error record."""

    def __init__(self, dataset: Any, skip: Tuple[Type[BaseException], ...]) -> None:
        self.dataset, self.skip = dataset, skip

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> _Item:
        try:
            item = self.dataset[index]
        except self.skip as error:
            message = str(error) if isinstance(error, UnreadableExampleError) else f"{type(error).__name__}: {error}"
            return _Item(index, None, None, message.strip().splitlines()[0] if message.strip() else type(error).__name__)
        if isinstance(item, (tuple, list)):
            if not item:
                raise DatasetRunError(f"dataset item {index} is empty")
            value, target = item[0], item[1] if len(item) > 1 else None
        else:
            value, target = item, None
        if not isinstance(value, Tensor):
            raise DatasetRunError(f"dataset item {index} is {type(value).__name__}; it must be a tensor or (tensor, target)")
        return _Item(index, value, target, None)


def _as_list(items: List[_Item]) -> List[_Item]:
    return items


def _batches_by_shard(
    dataset: Any,
    shards: Mapping[int, Sequence[int]],
    batch_size: int,
    skip: Tuple[Type[BaseException], ...],
    workers: int,
) -> Iterator[Tuple[int, List[_Item], bool]]:
    """``(shard, one batch of its items, whether it is the shard's last)`` for each shard's indices in turn.

    One ``DataLoader`` reads them all, so its worker processes start once
    and read ahead across shard boundaries.
    """
    batches: List[List[int]] = []
    owners: List[Tuple[int, bool]] = []
    for shard, indices in shards.items():
        cut = [list(indices[i : i + batch_size]) for i in range(0, len(indices), batch_size)]
        batches += cut
        owners += [(shard, k == len(cut) - 1) for k in range(len(cut))]
    if not batches:
        return
    loader = torch.utils.data.DataLoader(
        _SafeItems(dataset, skip), batch_sampler=batches, collate_fn=_as_list, num_workers=workers
    )
    for (shard, last), items in zip(owners, loader):
        yield shard, items, last


# ---------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------
def _write_atomically(path: str, write: Callable[[Any], None]) -> None:
    """``write(file)`` to a temporary file beside ``path``, synced, then renamed to ``path``."""
    temporary = f"{path}{_TEMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with open(temporary, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise


def _write_json(path: str, value: Any) -> None:
    _write_atomically(path, lambda handle: handle.write(json.dumps(value, indent=1).encode()))


def _read_json(path: str) -> Any:
    with open(path) as handle:
        return json.load(handle)


def _shard_name(shard: int) -> str:
    return f"{shard:08d}"


def _records(out_dir: str) -> Dict[int, Dict[str, Any]]:
    """The records of the done shards, by shard number."""
    folder = os.path.join(out_dir, "shards")
    if not os.path.isdir(folder):
        return {}
    found = {}
    for name in os.listdir(folder):
        match = _SHARD_NAME.match(name)
        if match:
            found[int(match.group(1))] = _read_json(os.path.join(folder, name))
    return found


def _remove_temporaries(out_dir: str) -> None:
    """Delete what killed writers left: files with a temporary name (never a finished file)."""
    for folder, _, files in os.walk(out_dir):
        for name in files:
            if _TEMP_MARK in name:
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(folder, name))


def _as_numpy(tensor: Tensor) -> np.ndarray:
    tensor = tensor.cpu()
    if tensor.dtype in (torch.bfloat16, torch.float16):
        tensor = tensor.float()  # numpy has no bfloat16: both half precisions are stored as float32
    return tensor.numpy()


# ---------------------------------------------------------------------------
# progress
# ---------------------------------------------------------------------------
class _Progress:
    """Rank 0's view of all processes' progress: a tqdm bar on a terminal, else a line every ``interval`` s.

    The processes add what they finish to a counter in the process group's
    key-value store, so rank 0 shows the whole run, not only its own part.
    """

    def __init__(self, info: ProcessInfo, total: int, what: str, show: Optional[bool], interval: float = 30.0) -> None:
        self.info, self.total, self.what, self.interval = info, total, what, interval
        self.count, self.started, self.printed = 0, time.perf_counter(), time.perf_counter()
        self.key = f"captum_graph/{what}/{_broadcast(uuid.uuid4().hex)}"
        self.store = _store()
        self.bar = None
        self.active = info.rank == 0 and show is not False and total > 0
        if self.active and (show or sys.stderr.isatty()):
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc=what, unit="image", dynamic_ncols=True)
            except ImportError:
                pass

    def update(self, count: int) -> None:
        if self.store is not None:
            done = self.store.add(self.key, count)
        else:  # no shared store: rank 0's own share, scaled
            self.count += count
            done = min(self.total, self.count * self.info.world_size)
        if not self.active:
            return
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
        elif time.perf_counter() - self.printed >= self.interval:
            self._line(done)

    def _line(self, done: int) -> None:
        elapsed = time.perf_counter() - self.started
        rate = done / elapsed if elapsed > 0 else 0.0
        print(f"  {self.what}: {done}/{self.total} images, {rate:.2f} images/s", file=sys.stderr, flush=True)
        self.printed = time.perf_counter()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _store() -> Optional[Any]:
    if not _distributed():
        return None
    # Fragile: torch's private accessor of the default group's store (torch 2.x); without it the bar
    # shows rank 0's share scaled by the number of processes. test_dataset_api.py fails if it moves.
    getter = getattr(dist.distributed_c10d, "_get_default_store", None)
    try:
        return getter() if getter is not None else None
    except RuntimeError:
        return None


# ---------------------------------------------------------------------------
# attribution
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class RunSummary:
    """What an output directory holds after :func:`attribute_dataset` (the same on every process).

    Attributes:
        out_dir: the directory.
        methods: the method names (one folder each).
        examples: examples in the dataset.
        stored: examples with attributions on disk.
        failed: key -> why the example could not be read.
        complete: every shard is done.
        shards_before: shards already done when this run started (resume).
        shards_now: shards this run did.
        examples_now: examples in those shards (read or not).
        world_size: processes of this run.
        seconds: wall time of this run's attribution, first batch to last shard.
    """

    out_dir: str
    methods: Tuple[str, ...]
    examples: int
    stored: int
    failed: Dict[str, str]
    complete: bool
    shards_before: int
    shards_now: int
    examples_now: int
    world_size: int
    seconds: float


def attribute_dataset(
    explainer_factory: Callable[[torch.device], Any],
    dataset: Any,
    out_dir: str,
    *,
    batch_size: int = 16,
    target: Target = None,
    resume: bool = False,
    shard_size: Optional[int] = None,
    keys: Optional[Sequence[str]] = None,
    device: Union[None, str, torch.device] = None,
    num_workers: int = 0,
    skip_errors: Tuple[Type[BaseException], ...] = (OSError,),
    metadata: Optional[Mapping[str, Any]] = None,
    progress: Optional[bool] = None,
) -> RunSummary:
    """Explain every example of ``dataset`` and write the attributions to ``out_dir`` as shards.

    Runs as one process, or under ``torchrun`` on all its processes (see
    :func:`process_group`); every process calls it with the same arguments.

    Args:
        explainer_factory: ``factory(device)``, called once in every process:
            builds the model on ``device`` and returns a Captum attribution
            object (folder ``attribution/``), a dict ``{method name: attribution
            object or function(inputs, targets) -> Tensor}``, or
            :class:`Explainers`.
        dataset: ``len(dataset)`` and ``dataset[i]``, a tensor or ``(tensor,
            target)``; inputs of one batch must have one shape.
        out_dir: output directory, shared by all processes (created if needed).
        batch_size: examples per explainer call.
        target: ``None`` (Captum's: the output is one number per example), a
            class index, a function of the model's output returning one class
            per example (``lambda logits: logits.argmax(1)``: the predicted
            class), or :data:`FROM_DATASET` (the dataset's ``(input, target)``).
        resume: continue the run in ``out_dir``, skipping its done shards.
            Without it, a directory that already holds a run is refused.
        shard_size: examples per shard file (default: ``batch_size``, or the
            resumed run's).
        keys: one unique name per example (default: ``dataset.keys`` when it is
            a sequence, e.g. :class:`ImageFiles`' relative paths, else the index).
        device: this process's device (see :func:`process_group`).
        num_workers: ``DataLoader`` worker processes reading examples.
        skip_errors: exceptions of reading an example that skip it (it is
            listed in the index) instead of stopping the run.
        metadata: JSON-serialisable notes kept in ``run.json``.
        progress: rank 0's progress: ``None`` a bar on a terminal, else a line
            every 30 s; ``True`` always; ``False`` never.

    Returns:
        :class:`RunSummary`, on every process.

    Raises:
        DatasetRunError: ``out_dir`` holds another run (or one that does not fit
            when resuming), the processes see different datasets, bad keys,
            methods or targets.
    """
    if batch_size < 1:
        raise DatasetRunError(f"batch_size must be positive, got {batch_size}")
    if shard_size is not None and shard_size < 1:
        raise DatasetRunError(f"shard_size must be positive, got {shard_size}")
    with process_group(device) as info:
        explainers = _as_explainers(explainer_factory(info.device))
        keys = _dataset_keys(dataset, keys)
        settings = {
            "format": _FORMAT,
            "methods": list(explainers.methods),
            "examples": len(keys),
            "keys_sha256": _digest(keys),
        }
        seen = _all_gather((settings["keys_sha256"], settings["methods"]))
        if any(other != seen[0] for other in seen):
            raise DatasetRunError("the processes see different datasets or methods (keys or method names differ between ranks)")
        plan = _on_rank_zero(
            info, lambda: _start_run(out_dir, settings, keys, shard_size, batch_size, resume, dict(metadata or {}))
        )
        shards = plan["pending"][info.rank :: info.world_size]
        started = time.time()
        progress_bar = _Progress(info, plan["pending_examples"], "attributing", progress)
        size, count = plan["shard_size"], plan["examples"]
        indices = {shard: range(shard * size, min((shard + 1) * size, count)) for shard in shards}
        current: Optional[_ShardResult] = None
        try:
            for shard, items, last in _batches_by_shard(dataset, indices, batch_size, skip_errors, num_workers):
                if current is None:
                    current = _ShardResult(shard, indices[shard], list(explainers.methods))
                current.add(items, keys, explainers, target, info.device)
                progress_bar.update(len(items))
                if last:
                    current.write(out_dir, keys, info.rank, plan["run"])
                    current = None
        finally:
            progress_bar.close()
        _write_json(
            os.path.join(out_dir, "runs", plan["run"], f"rank{info.rank}.json"),
            {"rank": info.rank, "world_size": info.world_size, "device": str(info.device), "shards": shards,
             "started": started, "finished": time.time()},
        )
        _barrier()
        return _on_rank_zero(info, lambda: _finish_run(out_dir, plan))


def _start_run(
    out_dir: str,
    settings: Dict[str, Any],
    keys: List[str],
    shard_size: Optional[int],
    batch_size: int,
    resume: bool,
    metadata: Dict[str, Any],
) -> Dict[str, Any]:
    """Rank 0: check or create ``out_dir``'s run, list the shards still to do."""
    os.makedirs(out_dir, exist_ok=True)
    run_file = os.path.join(out_dir, "run.json")
    if os.path.exists(run_file):
        previous = _read_json(run_file)
        done = _records(out_dir)
        if not resume:
            raise DatasetRunError(
                f"{out_dir} already holds attributions ({len(done)} of {_shard_count(previous)} shards done); "
                "resume it (resume=True, --resume) or choose another directory"
            )
        for name in ("format", "methods", "examples", "keys_sha256"):
            if previous.get(name) != settings[name]:
                what = "the dataset's keys" if name == "keys_sha256" else name
                raise DatasetRunError(
                    f"cannot resume the run in {out_dir}: {what} differ ({previous.get(name)!r} there, {settings[name]!r} now)"
                )
        if shard_size is not None and shard_size != previous["shard_size"]:
            raise DatasetRunError(
                f"cannot resume the run in {out_dir} with shard_size {shard_size}: it was started with {previous['shard_size']}"
            )
        _remove_temporaries(out_dir)
    else:
        if _records(out_dir):
            raise DatasetRunError(f"{out_dir} holds shard records but no run.json: empty it or choose another directory")
        done = {}
        previous = dict(settings, shard_size=shard_size or batch_size, metadata=metadata, created=time.time())
        for folder in ("shards", *settings["methods"]):
            os.makedirs(os.path.join(out_dir, folder), exist_ok=True)
        _write_json(os.path.join(out_dir, "keys.json"), keys)
        _write_json(run_file, previous)  # last: a directory with run.json has its keys
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(out_dir, "index.json"))  # stale while shards change; rewritten at the end
    shard_size = previous["shard_size"]
    count = _shard_count(previous)
    pending = [shard for shard in range(count) if shard not in done]
    run = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    os.makedirs(os.path.join(out_dir, "runs", run), exist_ok=True)
    examples = previous["examples"]
    return {
        "run": run,
        "shard_size": shard_size,
        "examples": examples,
        "methods": settings["methods"],
        "pending": pending,
        "pending_examples": sum(min(shard_size, examples - shard * shard_size) for shard in pending),
        "done_before": len(done),
    }


def _shard_count(run: Mapping[str, Any]) -> int:
    return -(-run["examples"] // run["shard_size"])


class _ShardResult:
    """One shard's attributions as its batches come: stored rows, targets, unreadable examples, arrays."""

    def __init__(self, shard: int, indices: range, methods: List[str]) -> None:
        self.shard, self.indices, self.started = shard, indices, time.time()
        self.rows: List[int] = []
        self.targets: List[Optional[int]] = []
        self.failed: List[Dict[str, Any]] = []
        self.parts: Dict[str, List[np.ndarray]] = {name: [] for name in methods}

    def add(self, items: List[_Item], keys: Sequence[str], explainers: Explainers, target: Target, device: torch.device) -> None:
        """Explain one batch; an item that could not be read is recorded as failed."""
        self.failed += [{"key": keys[i.index], "index": i.index, "error": i.error} for i in items if i.error is not None]
        good = [item for item in items if item.error is None]
        if not good:
            return
        inputs = _stack([item.input for item in good], good).to(device)
        chosen = _targets(target, explainers, inputs, [item.target for item in good])
        for name, method in explainers.methods.items():
            self.parts[name].append(_as_numpy(_explain(method, inputs, chosen)))
        self.rows += [item.index for item in good]
        self.targets += [None] * len(good) if chosen is None else chosen.tolist()

    def write(self, out_dir: str, keys: Sequence[str], rank: int, run: str) -> None:
        """Each method's array, then the shard's record (which marks the shard done)."""
        files, shapes = {}, {}
        for name, arrays in self.parts.items():
            if not arrays:
                continue
            if len({a.shape[1:] for a in arrays}) > 1:
                raise DatasetRunError(
                    f"method {name!r} gave attributions of different shapes within shard {self.shard} "
                    f"({sorted({a.shape[1:] for a in arrays})}); use shard_size=batch_size for inputs of varying size"
                )
            array = np.concatenate(arrays)
            files[name] = f"{name}/{_shard_name(self.shard)}.npy"
            shapes[name] = list(array.shape)
            _write_atomically(os.path.join(out_dir, files[name]), functools.partial(np.save, arr=array, allow_pickle=False))
        record = {
            "shard": self.shard,
            "start": self.indices.start,
            "stop": self.indices.stop,
            "keys": [keys[i] for i in self.rows],
            "indices": self.rows,
            "targets": None if self.rows and self.targets[0] is None else self.targets,
            "failed": self.failed,
            "files": files,
            "shapes": shapes,
            "rank": rank,
            "run": run,
            "seconds": round(time.time() - self.started, 3),
        }
        _write_json(os.path.join(out_dir, "shards", f"{_shard_name(self.shard)}.json"), record)


def _stack(inputs: List[Tensor], items: List[_Item]) -> Tensor:
    shapes = {tuple(t.shape) for t in inputs}
    if len(shapes) > 1:
        raise DatasetRunError(
            f"examples {[item.index for item in items]} have inputs of different shapes {sorted(shapes)}; "
            "resize them to one shape, or use batch_size=1"
        )
    return torch.stack(inputs)


def _finish_run(out_dir: str, plan: Mapping[str, Any]) -> RunSummary:
    """Rank 0, after every process is done: write ``index.json`` and summarise."""
    run = _read_json(os.path.join(out_dir, "run.json"))
    records = _records(out_dir)
    complete = len(records) == _shard_count(run)
    ordered = [records[shard] for shard in sorted(records)]
    failed = [entry for record in ordered for entry in record["failed"]]
    index = {
        "format": _FORMAT,
        "methods": run["methods"],
        "examples": run["examples"],
        "shard_size": run["shard_size"],
        "complete": complete,
        "stored": sum(len(record["indices"]) for record in ordered),
        "failed": failed,
        "shards": ordered,
    }
    _write_json(os.path.join(out_dir, "index.json"), index)
    logs = [_read_json(os.path.join(out_dir, "runs", plan["run"], name)) for name in os.listdir(os.path.join(out_dir, "runs", plan["run"])) if name.endswith(".json")]
    seconds = max((log["finished"] for log in logs), default=0.0) - min((log["started"] for log in logs), default=0.0)
    return RunSummary(
        out_dir=out_dir,
        methods=tuple(run["methods"]),
        examples=run["examples"],
        stored=index["stored"],
        failed={entry["key"]: entry["error"] for entry in failed},
        complete=complete,
        shards_before=plan["done_before"],
        shards_now=len(plan["pending"]),
        examples_now=plan["pending_examples"],
        world_size=len(logs),
        seconds=seconds,
    )


# ---------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------
class AttributionStore(Mapping):
    """One method's attributions in an output directory: key -> numpy array, read when asked for.

    Built by :func:`open_attributions`. Iterates in dataset order over the
    examples that have attributions. Each lookup reads one row of a shard file
    (memory-mapped; the few most recent shards stay open).

    Attributes:
        method: the method read.
        methods: all methods of the run.
        complete: every shard of the run is done.
        failed: key -> why the example could not be read (it has no attribution).
        targets: key -> the class explained (``None`` where the run had no target).
    """

    def __init__(self, out_dir: str, method: Optional[str] = None) -> None:
        run_file = os.path.join(out_dir, "run.json")
        if not os.path.isfile(run_file):
            raise DatasetRunError(f"{out_dir} holds no attribution run (no run.json)")
        run = _read_json(run_file)
        methods = list(run["methods"])
        if method is None:
            if len(methods) > 1:
                raise DatasetRunError(f"{out_dir} holds several methods, {', '.join(methods)}: name one")
            method = methods[0]
        if method not in methods:
            raise DatasetRunError(f"{out_dir} holds no method {method!r}; it holds {', '.join(methods)}")
        self.out_dir, self.method, self.methods = out_dir, method, tuple(methods)
        records = _index_records(out_dir, run)
        self.complete = len(records) == _shard_count(run)
        self._files: Dict[int, str] = {}
        location: Dict[str, Tuple[int, int]] = {}
        self.failed: Dict[str, str] = {}
        self.targets: Dict[str, Optional[int]] = {}
        for record in records:
            shard = record["shard"]
            if record["indices"]:
                self._files[shard] = os.path.join(out_dir, record["files"][method])
            targets = record["targets"] or [None] * len(record["keys"])
            for row, (key, chosen) in enumerate(zip(record["keys"], targets)):
                location[key] = (shard, row)
                self.targets[key] = chosen
            self.failed.update({entry["key"]: entry["error"] for entry in record["failed"]})
        order = {key: i for i, key in enumerate(_read_json(os.path.join(out_dir, "keys.json")))}
        self._location = dict(sorted(location.items(), key=lambda item: order[item[0]]))

    def __getitem__(self, key: str) -> np.ndarray:
        shard, row = self._location[key]
        return np.array(self._shard(shard)[row])

    def __iter__(self) -> Iterator[str]:
        return iter(self._location)

    def __len__(self) -> int:
        return len(self._location)

    def __contains__(self, key: object) -> bool:
        return key in self._location

    def _shard(self, shard: int) -> np.ndarray:
        return _memory_map(self._files[shard])

    def __repr__(self) -> str:
        state = "complete" if self.complete else "incomplete"
        return f"AttributionStore({self.out_dir!r}, method={self.method!r}, {len(self)} examples, {state})"


def _memory_map(path: str) -> np.ndarray:
    """The ``.npy`` file memory-mapped; a file replaced since (a resumed run redid its shard) is mapped anew."""
    status = os.stat(path)
    return _mapped(path, status.st_ino, status.st_mtime_ns, status.st_size)


@functools.lru_cache(maxsize=8)
def _mapped(path: str, inode: int, modified_ns: int, size: int) -> np.ndarray:
    return np.load(path, mmap_mode="r", allow_pickle=False)


def _index_records(out_dir: str, run: Mapping[str, Any]) -> List[Dict[str, Any]]:
    """The shard records: from ``index.json`` when it is complete, else from the records on disk."""
    index_file = os.path.join(out_dir, "index.json")
    if os.path.isfile(index_file):
        index = _read_json(index_file)
        if index.get("complete"):
            return index["shards"]
    records = _records(out_dir)
    return [records[shard] for shard in sorted(records)]


def open_attributions(out_dir: str, method: Optional[str] = None) -> AttributionStore:
    """The attributions of one method in ``out_dir``, as a lazy mapping from key to numpy array.

    Args:
        out_dir: the directory :func:`attribute_dataset` (or ``captum-graph
            attribute``) wrote. A run still going or stopped is read as far as
            it got (``complete`` says which).
        method: the method's name; may be left out when the run has only one.

    Raises:
        DatasetRunError: no run in ``out_dir``, or an unknown or ambiguous method.
    """
    return AttributionStore(out_dir, method)


# ---------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class EvaluationSummary:
    """Pixel-flipping results over a dataset (written to ``evaluation.json``).

    Attributes:
        aopc: method -> mean AOPC over the examples (higher: more faithful).
        random_aopc: AOPC of deleting pixels in random order (the reference), or ``None``.
        examples: examples evaluated.
        points: points of each deletion curve after the first.
        curves: method -> mean deletion curve (``points + 1`` target outputs).
        random_curve: the random order's mean curve, or ``None``.
    """

    aopc: Dict[str, float]
    random_aopc: Optional[float]
    examples: int
    points: int
    curves: Dict[str, List[float]] = field(repr=False)
    random_curve: Optional[List[float]] = field(repr=False)


def evaluate_dataset(
    model_factory: Callable[[torch.device], nn.Module],
    dataset: Any,
    out_dir: str,
    *,
    batch_size: int = 16,
    points: int = 16,
    baseline: float = 0.0,
    random_order: bool = True,
    seed: int = 0,
    resume: bool = False,
    device: Union[None, str, torch.device] = None,
    num_workers: int = 0,
    progress: Optional[bool] = None,
) -> EvaluationSummary:
    """Pixel-flipping AOPC of every method in ``out_dir``, over the dataset the attributions came from.

    Each example's pixels are set to ``baseline``, the most relevant first
    (channels summed; Grad-CAM's coarse map resized to the image), and the
    explained class's output is read at ``points + 1`` steps from none to all
    pixels deleted (:func:`captum_graph.perturbation.pixel_flipping`). AOPC is
    the mean drop from the first value. Deleting in random order is the
    reference. The work is split by shard, as :func:`attribute_dataset`'s, and
    the results are written per shard to ``evaluation/`` and summed up in
    ``evaluation.json``.

    Args:
        model_factory: ``factory(device)`` -> the model, built in every process.
        dataset: the same dataset (same keys) the attributions were made from.
        out_dir: a complete run of :func:`attribute_dataset` with a class target.
        batch_size: examples per pixel-flipping call; each runs the model on
            ``batch_size * (points + 1)`` images, ``batch_size`` at a time.
        points: steps of the curve.
        baseline: the value of a deleted pixel (0 is the mean colour of
            normalised images).
        random_order: also measure deletion in random order.
        seed: the random orders' seed (with the shard number).
        resume: keep the shards already evaluated; without it, start afresh.
        device, num_workers, progress: as in :func:`attribute_dataset`.

    Returns:
        :class:`EvaluationSummary`, on every process.
    """
    if batch_size < 1 or points < 1:
        raise DatasetRunError(f"batch_size and points must be positive, got {batch_size} and {points}")
    with process_group(device) as info:
        model = model_factory(info.device)
        keys = _dataset_keys(dataset, None)
        plan = _on_rank_zero(info, lambda: _start_evaluation(out_dir, _digest(keys), resume))
        records = {
            shard: _read_json(os.path.join(out_dir, "shards", f"{_shard_name(shard)}.json"))
            for shard in plan["pending"][info.rank :: info.world_size]
        }
        flipping = _Flipping(model, points, baseline, random_order, seed, batch_size, info.device)
        progress_bar = _Progress(info, plan["pending_examples"], "evaluating", progress)
        indices = {shard: record["indices"] for shard, record in records.items()}
        current: Optional[_ShardCurves] = None
        try:
            for shard, items, last in _batches_by_shard(dataset, indices, batch_size, (OSError,), num_workers):
                if current is None:
                    current = _ShardCurves(records[shard], out_dir)
                current.add(items, flipping)
                progress_bar.update(len(items))
                if last:
                    current.write(out_dir)
                    current = None
        finally:
            progress_bar.close()
        _barrier()
        return _on_rank_zero(info, lambda: _finish_evaluation(out_dir, plan["methods"], points, random_order))


def _start_evaluation(out_dir: str, digest: str, resume: bool) -> Dict[str, Any]:
    run_file = os.path.join(out_dir, "run.json")
    if not os.path.isfile(run_file):
        raise DatasetRunError(f"{out_dir} holds no attribution run to evaluate (no run.json)")
    run = _read_json(run_file)
    if run["keys_sha256"] != digest:
        raise DatasetRunError(f"the dataset is not the one the attributions in {out_dir} were made from (its keys differ)")
    records = _records(out_dir)
    if len(records) != _shard_count(run):
        raise DatasetRunError(
            f"the attribution run in {out_dir} is incomplete ({len(records)} of {_shard_count(run)} shards); resume it first"
        )
    if any(record["indices"] and record["targets"] is None for record in records.values()):
        raise DatasetRunError("pixel flipping follows a class: the attributions were made without a target (target=None)")
    folder = os.path.join(out_dir, "evaluation")
    if not resume and os.path.isdir(folder):
        for name in os.listdir(folder):
            os.remove(os.path.join(folder, name))
    os.makedirs(folder, exist_ok=True)
    _remove_temporaries(folder)
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(out_dir, "evaluation.json"))
    done = {int(m.group(1)) for m in map(_SHARD_NAME.match, os.listdir(folder)) if m}
    pending = [shard for shard in sorted(records) if shard not in done and records[shard]["indices"]]
    return {
        "methods": run["methods"],
        "pending": pending,
        "pending_examples": sum(len(records[shard]["indices"]) for shard in pending),
    }


class _Flipping(NamedTuple):
    """The pixel-flipping settings of an evaluation."""

    model: nn.Module
    points: int
    baseline: float
    random_order: bool
    seed: int
    max_batch: int
    device: torch.device


class _ShardCurves:
    """One shard's deletion curves per method (and in random order) as its batches come."""

    def __init__(self, record: Mapping[str, Any], out_dir: str) -> None:
        self.record = record
        self.rankings = {name: _memory_map(os.path.join(out_dir, path)) for name, path in record["files"].items()}
        self.row_of = {index: row for row, index in enumerate(record["indices"])}
        self.curves: Dict[str, List[Tensor]] = {name: [] for name in self.rankings}
        self.random_curves: List[Tensor] = []

    def add(self, items: List[_Item], flipping: _Flipping) -> None:
        from .perturbation import pixel_flipping, random_pixel_flipping

        broken = [item for item in items if item.error is not None]
        if broken:
            raise DatasetRunError(f"example {broken[0].index} was read for its attribution but cannot be read now: {broken[0].error}")
        images = _stack([item.input for item in items], items).to(flipping.device)
        if images.dim() != 4:
            raise DatasetRunError(f"pixel flipping needs image inputs (N, C, H, W), got {tuple(images.shape)}")
        rows = [self.row_of[item.index] for item in items]
        targets = torch.as_tensor([self.record["targets"][row] for row in rows], device=flipping.device)
        settings = dict(baseline=flipping.baseline, points=flipping.points, max_batch=flipping.max_batch)
        for name, stored in self.rankings.items():
            ranking = torch.from_numpy(np.array(stored[rows]))
            self.curves[name].append(pixel_flipping(flipping.model, images, targets, ranking, **settings).cpu())
        if flipping.random_order:
            # One seed per batch, fixed by the shard layout, not by the process that evaluates it.
            seed = flipping.seed * 1_000_003 + self.record["shard"] * 7919 + rows[0]
            self.random_curves.append(random_pixel_flipping(flipping.model, images, targets, repeats=1, seed=seed, **settings).cpu())

    def write(self, out_dir: str) -> None:
        """Per-example AOPC and the sum of the curves, per method, to ``evaluation/<shard>.json``."""
        from .perturbation import aopc_per_example

        joined = {name: torch.cat(parts).double() for name, parts in self.curves.items()}
        result = {
            "shard": self.record["shard"],
            "keys": self.record["keys"],
            "aopc": {name: aopc_per_example(curve).tolist() for name, curve in joined.items()},
            "curve_sums": {name: curve.sum(0).tolist() for name, curve in joined.items()},
        }
        if self.random_curves:
            randoms = torch.cat(self.random_curves).double()
            result["random_aopc"] = aopc_per_example(randoms).tolist()
            result["random_curve_sum"] = randoms.sum(0).tolist()
        _write_json(os.path.join(out_dir, "evaluation", f"{_shard_name(self.record['shard'])}.json"), result)


def _finish_evaluation(out_dir: str, methods: Sequence[str], points: int, random_order: bool) -> EvaluationSummary:
    folder = os.path.join(out_dir, "evaluation")
    results = [_read_json(os.path.join(folder, name)) for name in sorted(os.listdir(folder)) if _SHARD_NAME.match(name)]
    count = sum(len(result["keys"]) for result in results)
    if count == 0:
        raise DatasetRunError(f"nothing to evaluate in {out_dir}: no example has attributions")

    def mean_curve(sums: List[List[float]]) -> List[float]:
        return [sum(column) / count for column in zip(*sums)]

    aopc = {name: sum(sum(result["aopc"][name]) for result in results) / count for name in methods}
    curves = {name: mean_curve([result["curve_sums"][name] for result in results]) for name in methods}
    random_aopc = random_curve = None
    if random_order:
        random_aopc = sum(sum(result["random_aopc"]) for result in results) / count
        random_curve = mean_curve([result["random_curve_sum"] for result in results])
    summary = EvaluationSummary(aopc, random_aopc, count, points, curves, random_curve)
    _write_json(
        os.path.join(out_dir, "evaluation.json"),
        {"examples": count, "points": points, "aopc": aopc, "random_aopc": random_aopc, "curves": curves, "random_curve": random_curve},
    )
    return summary
