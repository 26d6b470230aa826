"""Builds the documentation site as ``make docs`` does (offline, warnings are errors) and checks what it shows.

The build runs the tutorials and the site's example scripts (cached by the
content of the package, the notebooks and the scripts in docs/_build/.cache,
so only a change runs them again): it is marked ``notebooks`` like the
tutorials' own tests.
"""
import json
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sphinx")
pytest.importorskip("myst_nb")
pytest.importorskip("nbclient")

REPO = Path(__file__).resolve().parents[2]
SOURCE = REPO / "docs" / "source"
sys.path.insert(0, str(SOURCE / "_ext"))

from captum_graph_docs import api, cli, napoleon_attributes, readme, references, rule_tables, runner  # noqa: E402

BUILD_TIMEOUT_S = 1200


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The built site's folder; the build must pass with -W."""
    out = tmp_path_factory.mktemp("site") / "html"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    command = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", str(SOURCE), str(out)]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    if done.returncode != 0:
        pytest.fail(f"the documentation build failed (make docs):\n{done.stdout[-6000:]}\n{done.stderr[-12000:]}", pytrace=False)
    return out


def _html(site: Path, page: str) -> str:
    path = site / f"{page}.html"
    assert path.is_file(), f"{page}.html was not built"
    return path.read_text(encoding="utf-8")


def _public_names():
    modules = api.public_modules(_configured_modules(), REPO)
    return api.public_names(modules)


def _configured_modules():
    return runpy.run_path(str(SOURCE / "conf.py"))["api_modules"]


# ---------------------------------------------------------------------------
# without building
# ---------------------------------------------------------------------------
def test_every_public_name_has_a_docstring():
    missing = api.missing_docstrings(_public_names())
    assert not missing, f"public names without a docstring (add one; the site renders them): {missing}"


@pytest.mark.parametrize("rule", rule_tables.rule_classes(), ids=lambda rule: rule.__name__)
def test_every_rule_has_a_formula_and_a_paper(rule):
    """The rules page shows each rule's formula and paper: its table, or the rule's docstring."""
    doc = rule.__doc__ or ""
    assert re.search(r"``[^`]*R[^`]*=[^`]*``", doc), f"{rule.__name__}'s docstring has no formula (``R_i = ...``)"
    assert re.search(r"\b(19|20)\d\d\b|From no paper", doc), f"{rule.__name__}'s docstring cites no paper (Author et al. year)"


def test_rules_missing_from_the_formula_table_are_listed_from_their_docstrings():
    everything = rule_tables.other_rules_table("")
    assert all(f"captum_graph.rules.{rule.__name__}`" in everything for rule in rule_tables.rule_classes())
    assert rule_tables.other_rules_table(everything) == ""


def test_the_readme_and_tutorial_imports_are_public_modules():
    modules = api.imported_modules(api.usage_texts(REPO))
    assert {"captum_graph", "captum_graph.attr"} <= set(modules)
    assert all(not part.startswith("_") for m in modules for part in m.split("."))


def test_imported_modules_reads_every_form_of_import():
    text = "from captum_graph import viz\nfrom captum_graph.attr import LRP\nimport captum_graph.report\nfrom captum_graph._x import y\nfrom captum_graph import (\n    filters,\n)"
    expected = ["captum_graph", "captum_graph.viz", "captum_graph.attr", "captum_graph.report", "captum_graph.filters"]
    assert api.imported_modules([text]) == expected


def test_references_resolve_importable_objects_only():
    assert references.import_object("captum_graph.attr.LRP.attribute") is not references._NOT_FOUND
    assert references.import_object("torch.nn.Module") is not references._NOT_FOUND
    assert references.import_object("int") is int
    assert references.import_object("captum_graph.tracing.trace") is references._NOT_FOUND  # a renamed function


@pytest.mark.parametrize("text", ["int", "Optional[Tuple[str, nn.Module]]", "torch.Tensor", "str | None"])
def test_types_before_a_colon_stay_types(text):
    assert napoleon_attributes.looks_like_type(text)


def test_a_sentence_before_a_colon_is_not_a_type():
    assert not napoleon_attributes.looks_like_type("The qualified name")


def test_readme_sections_are_found_with_their_links_rewritten():
    text = "x\n<!-- demo: generated -->\nSee [the tutorial](tutorials/01_a.ipynb) and [run.py](benchmarks/run.py#x).\n<!-- /demo -->\n"
    sections = readme.sections(text)
    assert list(sections) == ["demo"]
    site = readme.for_site(sections["demo"])
    assert "(/_generated/run/tutorials/01_a.ipynb)" in site and "run.py (`benchmarks/run.py`)" in site


def test_cli_subcommands_are_found():
    from captum_graph.cli import _parser

    assert set(cli.subcommands(_parser())) >= {"demo", "inspect", "explain"}


def test_outputs_are_keyed_by_package_notebook_and_versions(tmp_path):
    """A cached output is reused only for the same notebook or script and the same package files."""
    (tmp_path / "captum_graph").mkdir()
    module = tmp_path / "captum_graph" / "rules.py"
    module.write_text("A = 1\n")
    notebook = tmp_path / "01.ipynb"
    notebook.write_text("{}")
    job = runner.Job("notebook", notebook)
    before = job.key(runner.fingerprint(tmp_path))
    assert job.key(runner.fingerprint(tmp_path)) == before
    module.write_text("A = 2\n")
    after_package = job.key(runner.fingerprint(tmp_path))
    notebook.write_text('{"cells": []}')
    after_notebook = job.key(runner.fingerprint(tmp_path))
    assert len({before, after_package, after_notebook}) == 3


def test_expected_exception_is_read_from_the_script(tmp_path):
    script = tmp_path / "s.py"
    script.write_text("# expect: CaptureError\nraise ValueError\n")
    assert runner.expected_exception(script) == "CaptureError"
    script.write_text("print(1)\n")
    assert runner.expected_exception(script) is None


# ---------------------------------------------------------------------------
# the built site
# ---------------------------------------------------------------------------
@pytest.mark.notebooks
def test_every_public_name_has_a_rendered_page(site):
    for public in _public_names():
        page = _html(site, f"_generated/api/{public.page_name}")
        assert f'id="{public.page_name}"' in page, f"{public.page_name}.html does not document {public.page_name}"
        module_page = _html(site, f"_generated/api/{public.module}")
        assert f"{public.page_name}.html" in module_page, f"{public.module}'s page does not list {public.name}"


@pytest.mark.notebooks
def test_class_pages_show_captum_graph_members_only(site):
    lrp = _html(site, "_generated/api/captum_graph.attr.LRP")
    assert 'id="captum_graph.attr.LRP.attribute"' in lrp and 'id="captum_graph.attr.LRP.rule_report"' in lrp
    assert 'id="captum_graph.attr.LRP.compute_convergence_delta"' not in lrp  # Captum's, documented by Captum


@pytest.mark.notebooks
def test_cli_page_has_every_subcommand_help(site):
    page = _html(site, "cli")
    for name, text in cli.help_texts().items():
        assert f"captum-graph {name} --help".replace("  ", " ") in page, f"no help for captum-graph {name}"
        first_option = re.search(r"--[a-z][a-z-]+", text.split("options:")[-1])
        if first_option:
            assert first_option.group(0) in page


@pytest.mark.notebooks
def test_tutorials_are_rendered_with_outputs_of_the_current_notebooks(site):
    import nbformat

    notebooks = sorted((REPO / "tutorials").glob("*.ipynb"))
    listing = _html(site, "tutorials")
    for path in notebooks:
        assert f"_generated/run/tutorials/{path.stem}.html" in listing, f"{path.name} is not in the tutorials list"
        page = _html(site, f"_generated/run/tutorials/{path.stem}")
        assert "cell_output" in page, f"{path.name} was rendered without outputs"
        executed = nbformat.read(SOURCE / "_generated" / "run" / "tutorials" / path.name, as_version=4)
        source = nbformat.read(path, as_version=4)
        assert [c.source for c in executed.cells] == [c.source for c in source.cells], f"{path.name}: rendered an older notebook"
        code_cells = [c for c in executed.cells if c.cell_type == "code"]
        assert all(c.execution_count for c in code_cells), f"{path.name}: a code cell was not executed"


@pytest.mark.notebooks
def test_faq_shows_the_errors_the_examples_raise(site):
    page = _html(site, "faq")
    for script in sorted((SOURCE / "examples").glob("*.py")):
        result = json.loads((SOURCE / "_generated" / "run" / "examples" / f"{script.stem}.json").read_text())
        assert result["exception"] == runner.expected_exception(script), script.name
        if result["exception"]:
            assert f"{result['exception']}: " in page, f"faq.html does not show {script.name}'s {result['exception']}"


@pytest.mark.notebooks
def test_readme_sections_are_included(site):
    text = (REPO / "README.md").read_text()
    sections = readme.sections(text)
    pages = {"coverage": "coverage", "timm coverage": "coverage", "presets": "presets"}
    for name, page in pages.items():
        assert name in sections, f"README.md lost its <!-- {name} --> section"
        first_cell = re.search(r"^\| ([\w.-]+) \|", sections[name], re.M)
        if first_cell:
            assert first_cell.group(1) in _html(site, page), f"{page}.html does not show the README's {name} table"


@pytest.mark.notebooks
def test_how_it_works_figure_is_drawn(site):
    assert (site / "_images" / "residual_block.png").is_file()
    assert "residual_block.png" in _html(site, "how_it_works")
