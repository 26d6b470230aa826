"""Runs the tutorials and the site's scripts at build time; their outputs are what the site shows.

Jobs:

* every ``tutorials/*.ipynb``, executed top to bottom in a kernel of this
  interpreter (as ``tests/notebooks`` does), saved with its outputs to
  ``_generated/run/tutorials/``;
* every ``examples/*.py`` and ``figures/*.py`` of the site, run as
  ``__main__`` in an empty folder: what it prints and the exception it ends
  with go to ``_generated/run/examples/NAME.json``, the files it writes to
  ``_generated/run/figures/``. A script states the exception it is meant to
  end with in a line ``# expect: ExceptionName``; ending otherwise, or a
  notebook cell that raises, is a warning (so the ``-W`` build fails).

Results are cached in ``docs/_build/.cache/run`` under a hash of the job's
source, of every file of the ``captum_graph`` package and of the versions of
the libraries it runs with: a change to any of them runs the job again, so no
output older than the code is ever rendered. Failures are not cached. Jobs run
in forked worker processes, two at a time.
"""
import contextlib
import hashlib
import io
import json
import multiprocessing
import os
import runpy
import shutil
import sys
import tempfile
import traceback
import warnings
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Dict, List, Optional, Set

from sphinx.application import Sphinx
from sphinx.util import logging

from .files import write_if_changed

logger = logging.getLogger(__name__)

VERSIONED = ("torch", "torchvision", "captum", "numpy", "matplotlib", "timm", "transformers", "zennit", "scikit-learn", "nbclient", "ipykernel")
CELL_TIMEOUT_S = 300
EXPECT = "# expect:"


@dataclass(frozen=True)
class Job:
    """A notebook to execute or a script to run, and where its outputs go."""

    kind: str  # "notebook", "example" or "figure"
    source: Path

    @property
    def name(self) -> str:
        return self.source.stem

    def key(self, fingerprint: str) -> str:
        digest = hashlib.sha256(f"{self.kind}\0{fingerprint}\0{self.source.name}\0".encode())
        digest.update(self.source.read_bytes())
        return digest.hexdigest()[:32]


def fingerprint(repo: Path) -> str:
    """A hash of the package's files and of the versions of what the jobs run with."""
    digest = hashlib.sha256(sys.version.encode())
    for path in sorted((repo / "captum_graph").rglob("*")):
        if path.is_file() and path.suffix != ".pyc":
            digest.update(path.relative_to(repo).as_posix().encode() + b"\0" + path.read_bytes())
    for name in VERSIONED:
        try:
            digest.update(f"{name}=={metadata.version(name)}".encode())
        except metadata.PackageNotFoundError:
            digest.update(f"{name} absent".encode())
    return digest.hexdigest()


def expected_exception(script: Path) -> Optional[str]:
    """The exception a script declares it ends with (``# expect: Name``), if any."""
    for line in script.read_text(encoding="utf-8").splitlines():
        if line.startswith(EXPECT):
            return line[len(EXPECT) :].strip()
    return None


def jobs(repo: Path, source: Path) -> List[Job]:
    found = [Job("notebook", p) for p in sorted((repo / "tutorials").glob("*.ipynb"))]
    found += [Job("example", p) for p in sorted((source / "examples").glob("*.py"))]
    found += [Job("figure", p) for p in sorted((source / "figures").glob("*.py"))]
    return found


# ---------------------------------------------------------------------------
# in the worker process
# ---------------------------------------------------------------------------
def _execute(job: Job, repo: Path) -> Dict:
    """Run one job; returns ``{"problem": str or None, "result": dict, "files": {name: bytes}}``.

    What the job (or its kernel) writes to standard error is kept out of the
    build's log, and shown only with a problem.
    """
    with tempfile.TemporaryFile() as stderr:
        sys.stderr.flush()
        os.dup2(stderr.fileno(), 2)  # this worker process runs one job only
        try:
            outcome = _execute_notebook(job, repo) if job.kind == "notebook" else _execute_script(job)
        except Exception:  # the build reports it; the worker must return something picklable
            outcome = {"problem": traceback.format_exc(), "result": {}, "files": {}}
        sys.stderr.flush()
        if outcome["problem"]:
            stderr.seek(0)
            written = stderr.read().decode(errors="replace")[-3000:]
            outcome["problem"] += f"\nstandard error (end):\n{written}" if written.strip() else ""
    return outcome


def _kernel_manager():
    """A kernel manager that starts this interpreter's ipykernel, whatever ``python`` the kernelspec names."""
    from jupyter_client.manager import KernelManager

    manager = KernelManager(kernel_name="python3")
    try:
        spec = manager.kernel_spec
    except Exception:  # no python3 kernelspec installed: ipykernel's own is used
        spec = None
    if spec is not None:
        spec.argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    return manager


def _execute_notebook(job: Job, repo: Path) -> Dict:
    import nbclient
    import nbformat

    os.environ["PYTHONPATH"] = os.pathsep.join([str(repo)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    notebook = nbformat.read(job.source, as_version=4)
    client = nbclient.NotebookClient(
        notebook, km=_kernel_manager(), timeout=CELL_TIMEOUT_S, resources={"metadata": {"path": str(job.source.parent)}}
    )
    problem = None
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as error:
        problem = f"a cell raised\n{error}"
    return {"problem": problem, "result": {}, "files": {job.source.name: nbformat.writes(notebook).encode()}}


def _execute_script(job: Job) -> Dict:
    os.environ["MPLBACKEND"] = "Agg"
    warnings.simplefilter("ignore")
    workdir = Path(tempfile.mkdtemp(prefix="captum_graph_docs_"))
    os.chdir(workdir)
    sys.argv = [str(job.source)]
    printed, raised, message = io.StringIO(), None, None
    with contextlib.redirect_stdout(printed):
        try:
            runpy.run_path(str(job.source), run_name="__main__")
        except Exception as error:
            raised, message = type(error).__name__, str(error)
            trace = traceback.format_exc()
    files = {p.relative_to(workdir).as_posix(): p.read_bytes() for p in sorted(workdir.rglob("*")) if p.is_file()}
    shutil.rmtree(workdir, ignore_errors=True)
    expected = expected_exception(job.source)
    problem = None
    if raised != expected:
        ended = f"raised {raised}:\n{trace}" if raised else "raised nothing"
        problem = f"expected {expected or 'no exception'}, but it {ended}"
    result = {"stdout": printed.getvalue(), "exception": raised, "message": message}
    return {"problem": problem, "result": result, "files": files}


# ---------------------------------------------------------------------------
# in the build
# ---------------------------------------------------------------------------
def cache_folder(repo: Path) -> Path:
    return Path(os.environ.get("CAPTUM_GRAPH_DOCS_CACHE", repo / "docs" / "_build" / ".cache" / "run"))


def _store(folder: Path, outcome: Dict) -> None:
    staging = folder.with_name(folder.name + f".{os.getpid()}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "files").mkdir(parents=True)
    (staging / "result.json").write_text(json.dumps(outcome["result"]))
    for name, data in outcome["files"].items():
        (staging / "files" / name).parent.mkdir(parents=True, exist_ok=True)
        (staging / "files" / name).write_bytes(data)
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)


def _load(folder: Path) -> Dict:
    files = {p.relative_to(folder / "files").as_posix(): p.read_bytes() for p in (folder / "files").rglob("*") if p.is_file()}
    return {"problem": None, "result": json.loads((folder / "result.json").read_text()), "files": files}


def _run_pending(pending: List[Job], repo: Path) -> Dict[Job, Dict]:
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    workers = max(1, min(2, os.cpu_count() or 1, len(pending)))
    context = multiprocessing.get_context(method)
    outcomes = {}
    with context.Pool(workers, maxtasksperchild=1) as pool:
        results = {job: pool.apply_async(_execute, (job, repo)) for job in pending}
        for job, result in results.items():
            outcomes[job] = result.get()
            logger.info(f"[captum_graph_docs] ran {job.source.relative_to(repo)}")
    return outcomes


def _output_files(job: Job, outcome: Dict, folder: Path) -> Set[Path]:
    if job.kind == "example":
        return {write_if_changed(folder / "examples" / f"{job.name}.json", json.dumps(outcome["result"], indent=1))}
    subfolder = folder / ("tutorials" if job.kind == "notebook" else "figures")
    return {write_if_changed(subfolder / name, data) for name, data in outcome["files"].items()}


def run_all(app: Sphinx, repo: Path, source: Path, folder: Path) -> Set[Path]:
    """Run (or take from the cache) every job; write their outputs under ``folder``."""
    key_base = fingerprint(repo)
    cache = cache_folder(repo)
    todo = jobs(repo, source)
    cached = {job: cache / job.key(key_base) for job in todo}
    pending = [job for job in todo if not (cached[job] / "result.json").exists()]
    if pending:
        names = ", ".join(job.source.name for job in pending)
        logger.info(f"[captum_graph_docs] running {len(pending)} of {len(todo)} notebooks and scripts: {names}")
    outcomes = _run_pending(pending, repo) if pending else {}
    written: Set[Path] = set()
    for job in todo:
        outcome = outcomes.get(job) or _load(cached[job])
        if outcome["problem"]:
            logger.warning(f"{job.source.relative_to(repo)}: {outcome['problem']}", type="captum_graph", subtype="run")
        elif job in outcomes:
            _store(cached[job], outcome)
        written |= _output_files(job, outcome, folder)
    return written
