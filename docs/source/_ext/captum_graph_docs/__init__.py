"""Sphinx extension that produces, at build time, every part of the site that code can produce.

At ``builder-inited`` it writes ``_generated/`` (git-ignored) in the source
folder:

* ``api/``: one page per public name, from each documented module's ``__all__``
  (:mod:`.api`);
* ``cli.md``: the ``--help`` of the command line and of each subcommand (:mod:`.cli`);
* ``rules/``: the tables of rule presets and default rules, and of the rules
  the hand-written table of ``rules.md`` lacks (:mod:`.rule_tables`);
* ``readme/``: sections of the README between ``<!-- name -->`` markers (:mod:`.readme`);
* ``run/``: the tutorials executed, the FAQ's example scripts run (their output
  or error text), the figures drawn (:mod:`.runner`), cached by content so
  that nothing is rendered from an older package or notebook.

It also resolves references to importable Python objects that have no page
(:mod:`.references`), adds the ``example`` directive (:mod:`.directives`), and
keeps napoleon from reading a sentence with a colon as ``type: description``
(:mod:`.napoleon_attributes`).
"""
from pathlib import Path

from sphinx.application import Sphinx
from sphinx.util import logging

from . import api, cli, directives, napoleon_attributes, readme, references, rule_tables, runner

logger = logging.getLogger(__name__)

GENERATED = "_generated"


def _generate(app: Sphinx) -> None:
    source = Path(app.srcdir)
    generated = source / GENERATED
    repo = source.parents[1]
    written = set()
    written |= api.write_pages(app, generated / "api")
    written |= cli.write_page(generated / "cli.md")
    written |= rule_tables.write_tables(generated / "rules", source / "rules.md")
    written |= readme.write_sections(repo / "README.md", generated / "readme")
    written |= runner.run_all(app, repo, source, generated / "run")
    _remove_stale(generated, written)


def _remove_stale(generated: Path, written: set) -> None:
    """Delete generated files this build did not write (a renamed notebook, a removed name)."""
    for path in sorted(generated.rglob("*"), reverse=True):
        if path.is_file() and path not in written:
            path.unlink()
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()


def setup(app: Sphinx) -> dict:
    app.add_config_value("api_modules", [], "env")
    app.connect("builder-inited", _generate)
    napoleon_attributes.setup()
    references.setup(app)
    directives.setup(app)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
