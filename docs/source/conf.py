"""Sphinx configuration of the captum_graph documentation (see docs/README.md).

Everything the site shows that code can produce is produced at build time by
the ``captum_graph_docs`` extension (``_ext/``): the API pages from the
modules' ``__all__``, the command line's ``--help``, the README sections, the
figure of a rewritten residual block, the FAQ's error messages and the
tutorials' outputs. Nothing is downloaded: no intersphinx.
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, REPO)  # the checkout's captum_graph, installed or not
sys.path.insert(0, os.path.join(HERE, "_ext"))

import captum_graph  # noqa: E402

project = "captum_graph"
author = "captum_graph contributors"
copyright = "captum_graph contributors, BSD-3-Clause"
release = version = captum_graph.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "myst_nb",
    "captum_graph_docs",
]

# Modules whose ``__all__`` is documented, besides those the README and the
# tutorials import from (found at build time, see captum_graph_docs.api).
api_modules = [
    "captum_graph",
    "captum_graph.attr",
    "captum_graph.filters",
    "captum_graph.rules",
    "captum_graph.report",
    "captum_graph.viz",
    "captum_graph.demo",
]

# Scripts, and generated fragments that pages include (not pages themselves).
exclude_patterns = [
    "_build", "**.ipynb_checkpoints", "examples/**", "comparisons/**", "figures/**",
    "_generated/readme/**", "_generated/rules/**", "_generated/cli.md",
]
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
root_doc = "index"

# Every reference must resolve: to a documented object, or (see
# captum_graph_docs.references) to an importable Python object shown as code.
nitpicky = True
suppress_warnings = ["myst.header"]  # the README's and notebooks' headings may skip a level

autodoc_default_options = {"member-order": "bysource"}
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
autoclass_content = "class"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

myst_enable_extensions = ["colon_fence"]  # formulas are plain text: no MathJax to fetch
myst_heading_anchors = 3
# The tutorials are executed by captum_graph_docs (cached by content), not by myst-nb.
nb_execution_mode = "off"
nb_merge_streams = True

html_theme = "furo"
html_title = f"captum_graph {release}"
html_static_path = ["_static"]
html_css_files = ["custom.css"]
html_show_sourcelink = False
