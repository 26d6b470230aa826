"""``benchmarks/run.py`` still runs and prints what the README's tables are made of.

A smoke run (``--quick``: 64x64 inputs, batch 2, resnet50 only) in a
subprocess, as ``make bench`` starts it. Nothing here is timed: the figures are
parsed for their shape and for the facts that do not depend on the machine
(Captum's answer is wrong on resnet50, the memory of each method is measured).
"""
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parents[2]


def _tables(text: str) -> List[List[Dict[str, str]]]:
    """The markdown tables of ``text``, as rows keyed by the header."""
    tables, header = [], None
    for line in text.splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if header is None:
            header = cells
            tables.append([])
        elif set(line) - set("|-"):
            tables[-1].append(dict(zip(header, cells)))
    return tables


def test_quick_benchmark_prints_the_readme_tables():
    done = subprocess.run(
        [sys.executable, "benchmarks/run.py", "--quick", "--models", "resnet50", "--markdown"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    methods, preparation = _tables(done.stdout)
    rows = {row["method"]: row for row in methods}
    assert {"InputXGradient", "captum_graph LRP", "Captum LRP", "captum_graph LayerGradCam (auto)"} <= set(rows)
    assert float(rows["InputXGradient"]["× IxG time"]) == 1.0
    assert float(rows["captum_graph LRP epsilon-plus-flat"]["median s"]) > 0
    for method in ("InputXGradient", "captum_graph LRP"):  # the methods --quick measures memory of
        assert float(rows[method]["peak extra MiB"]) > 0 and float(rows[method]["× IxG memory"]) > 0
    assert rows["Captum LRP"]["note"].startswith("WRONG answer"), rows["Captum LRP"]
    assert preparation[0]["model"] == "resnet50" and float(preparation[0]["prepare(), cache cleared (s)"]) > 0
    assert "Memory growth" in done.stdout and "live tensors" in done.stdout
