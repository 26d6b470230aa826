"""The ``example`` directive: a script of the site and what running it printed."""
import json
from pathlib import Path
from typing import Any, List

from docutils import nodes
from docutils.parsers.rst import directives
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective

from .runner import EXPECT

GENERATED_RUN = Path("_generated") / "run"


class Example(SphinxDirective):
    """Shows ``examples/NAME.py`` and, below it, its output from this build's run.

    The output is the script's printed text followed, if it ended with an
    exception, by ``ExceptionName: message`` (what a user sees last).
    Option ``:output-only:`` leaves the code out.
    """

    required_arguments = 1
    option_spec = {"output-only": directives.flag, "caption": directives.unchanged}

    def run(self) -> List[nodes.Node]:
        source = Path(self.env.srcdir) / self.arguments[0]
        result_path = Path(self.env.srcdir) / GENERATED_RUN / "examples" / f"{source.stem}.json"
        self.env.note_dependency(str(source))
        self.env.note_dependency(str(result_path))
        if not result_path.exists():
            raise self.error(f"no output for {self.arguments[0]}: is it under examples/ and did it run?")
        result = json.loads(result_path.read_text())
        shown = []
        if "output-only" not in self.options:
            code = "\n".join(line for line in source.read_text().splitlines() if not line.startswith(EXPECT)).strip()
            shown.append(_literal(code, "python", self.options.get("caption")))
        output = result["stdout"]
        if result["exception"]:
            output += f"{result['exception']}: {result['message']}"
        block = _literal(output.rstrip() or "(no output)", "text", "Output" if "output-only" not in self.options else None)
        block["classes"].append("example-output")
        shown.append(block)
        return shown


def _literal(text: str, language: str, caption: Any) -> nodes.Node:
    block = nodes.literal_block(text, text, language=language)
    if not caption:
        return block
    container = nodes.container("", literal_block=True, classes=["literal-block-wrapper"])
    container += nodes.caption(caption, caption)
    container += block
    return container


def setup(app: Sphinx) -> None:
    app.add_directive("example", Example)
