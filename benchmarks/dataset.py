"""Images per second of ``captum-graph attribute`` on 1 and 2 processes, next to a plain loop.

Writes ``--images`` JPEG files of mixed sizes (random smooth colours) to a
temporary folder and explains every one with captum_graph's ``LRP`` (default
rules) of a torchvision model with random weights (default resnet50), the
predicted class as target, preprocessed as ``captum-graph explain`` does
(resize the short side, centre-crop ``--size``, normalise). Three ways, each
in a fresh process, one after the other:

* **plain loop**: a script with no framework: list the files, then per batch
  preprocess, predict, ``LRP.attribute``, ``numpy.save``;
* **attribute, 1 process**: ``python -m captum_graph attribute ...``;
* **attribute, 2 processes**: ``torchrun --standalone --nproc-per-node 2 -m
  captum_graph attribute ...`` (torchrun gives each process one thread).

The one-process variants use torch's threads, or ``--threads``: on a busy
machine two threads that wait for each other can be much slower than one, so
``--threads 1`` separates the gain of a second process from that of avoiding
contended threads.

For each: the wall time of the whole command (start-up, model building and
graph capture included) and the attribution time, from the first batch to the
last file written (the first batch pays the graph capture in every variant),
over all processes; images per second of both, and the ratio to the plain
loop; and the steady rate, leaving out each process's first batch (it
captures the graph): per process its later batches' images over their
seconds, summed over the processes. Run:

    .venv/bin/python benchmarks/dataset.py                             # 64 images, resnet50, 224x224, batch 8
    .venv/bin/python benchmarks/dataset.py --images 16 --batch-size 4  # smoke run (two batches per process)
    .venv/bin/python benchmarks/dataset.py --markdown                  # the table as markdown
"""
import argparse
import glob
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_images(folder: str, count: int, seed: int = 0) -> None:
    """``count`` JPEGs from 160 to 400 pixels a side, in two subfolders."""
    import numpy as np
    from PIL import Image

    generator = np.random.default_rng(seed)
    for i in range(count):
        width, height = generator.integers(160, 401, size=2)
        coarse = generator.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((int(width), int(height)), Image.BILINEAR)
        path = os.path.join(folder, f"part{i % 2}", f"image{i:04d}.jpg")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        image.save(path, quality=90)


def plain_loop(args: argparse.Namespace) -> None:
    """The baseline, run in its own process: no framework, the same preprocessing and explainer."""
    import numpy as np
    import torch

    from captum_graph.attr import LRP
    from captum_graph.cli import IMAGENET_MEAN, IMAGENET_STD, _preprocess, load_model

    model = load_model(args.model)
    lrp = LRP(model)
    paths = sorted(glob.glob(os.path.join(args.data, "**", "*.jpg"), recursive=True))
    os.makedirs(args.out, exist_ok=True)
    started, batches = time.time(), []
    for number, start in enumerate(range(0, len(paths), args.batch_size)):
        batch_started = time.time()
        inputs = torch.stack([_preprocess(p, args.size, IMAGENET_MEAN, IMAGENET_STD)[0] for p in paths[start : start + args.batch_size]])
        with torch.no_grad():
            targets = model(inputs).argmax(1)
        relevance = lrp.attribute(inputs.requires_grad_(), target=targets).detach().numpy()
        np.save(os.path.join(args.out, f"{number:08d}.npy"), relevance)
        batches.append({"rank": 0, "images": len(inputs), "seconds": time.time() - batch_started})
    print(json.dumps({"seconds": time.time() - started, "threads": torch.get_num_threads(), "batches": batches}))


def timed(command: List[str], env: Dict[str, str]) -> Tuple[float, str]:
    """Wall seconds of ``command`` and what it printed."""
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"failed: {' '.join(command)}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return time.perf_counter() - started, done.stdout


def read_json(path: str) -> dict:
    with open(path) as handle:
        return json.load(handle)


def attribution_seconds(out: str) -> float:
    """First batch to last shard written, over all processes (from the run's rank logs)."""
    logs = [read_json(path) for path in glob.glob(os.path.join(out, "runs", "*", "rank*.json"))]
    return max(log["finished"] for log in logs) - min(log["started"] for log in logs)


def shard_times(out: str) -> List[dict]:
    """Each shard's process, images and seconds (from the shard records), in shard order."""
    records = [read_json(path) for path in sorted(glob.glob(os.path.join(out, "shards", "*.json")))]
    return [{"rank": r["rank"], "images": len(r["keys"]) + len(r["failed"]), "seconds": r["seconds"]} for r in records]


def steady_rate(batches: List[dict]) -> Optional[float]:
    """Images per second after each process's first batch (which captures the graph), summed over processes.

    ``None`` when a process has only one batch.
    """
    rate = 0.0
    for rank in {batch["rank"] for batch in batches}:
        later = [batch for batch in batches if batch["rank"] == rank][1:]
        if not later:
            return None
        rate += sum(batch["images"] for batch in later) / sum(batch["seconds"] for batch in later)
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64, help="images to explain (default: 64)")
    parser.add_argument("--size", type=int, default=224, help="input height and width (default: 224)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per LRP call (default: 8)")
    parser.add_argument("--model", default="torchvision:resnet50", help="captum-graph MODEL (default: torchvision:resnet50)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of the one-process variants (default: torch's choice)")
    parser.add_argument("--markdown", action="store_true", help="print the table as markdown")
    parser.add_argument("--probe", choices=["plain"], help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe == "plain":
        plain_loop(args)
        return

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([REPO] + [p for p in [env.get("PYTHONPATH")] if p])
    one_process = dict(env)
    if args.threads is not None:
        one_process["OMP_NUM_THREADS"] = str(args.threads)
    with tempfile.TemporaryDirectory(prefix="captum_graph_dataset_bench_") as root:
        data = os.path.join(root, "images")
        write_images(data, args.images)
        shared = [args.model, "--data", data, "--method", "lrp", "--size", str(args.size), "--batch-size", str(args.batch_size)]
        rows = []
        out = os.path.join(root, "plain")
        wall, printed = timed([sys.executable, __file__, "--probe", "plain", "--data", data, "--out", out, "--model", args.model,
                               "--size", str(args.size), "--batch-size", str(args.batch_size)], one_process)
        probe = json.loads(printed.strip().splitlines()[-1])
        rows.append(("plain loop", 1, probe["threads"], wall, probe["seconds"], steady_rate(probe["batches"])))
        out = os.path.join(root, "one")
        wall, _ = timed([sys.executable, "-m", "captum_graph", "attribute", *shared, "--out", out], one_process)
        rows.append(("captum-graph attribute", 1, probe["threads"], wall, attribution_seconds(out), steady_rate(shard_times(out))))
        out = os.path.join(root, "two")
        wall, _ = timed([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                      "-m", "captum_graph", "attribute", *shared, "--out", out], env)
        rows.append(("captum-graph attribute (torchrun)", 2, 1, wall, attribution_seconds(out), steady_rate(shard_times(out))))

    import torch

    print(
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; torch {torch.__version__}\n"
        f"{args.images} JPEGs (160-400 px), {args.model} with random weights, {args.size}x{args.size}, batch {args.batch_size}, "
        "captum_graph LRP (default rules), predicted class"
    )
    baseline, steady_baseline = args.images / rows[0][4], rows[0][5]
    header = ["variant", "processes", "threads per process", "wall s", "attribution s", "images/s (attribution)",
              "x plain loop", "images/s (after first batch)", "x plain loop ", "images/s (wall)"]
    table = []
    for name, processes, threads, wall, seconds, steady in rows:
        rate = args.images / seconds
        table.append([
            name, str(processes), str(threads), f"{wall:.1f}", f"{seconds:.1f}", f"{rate:.2f}", f"{rate / baseline:.2f}",
            "n/a" if steady is None else f"{steady:.2f}",
            "n/a" if steady is None or steady_baseline is None else f"{steady / steady_baseline:.2f}",
            f"{args.images / wall:.2f}",
        ])
    if args.markdown:
        print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
        print("\n".join("| " + " | ".join(row) + " |" for row in table))
    else:
        widths = [max(len(header[i]), *(len(row[i]) for row in table)) for i in range(len(header))]
        for row in [header] + table:
            print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)))


if __name__ == "__main__":
    main()
