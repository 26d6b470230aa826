"""Sections of the README, between ``<!-- name ... -->`` and ``<!-- /name -->``, for pages to include.

The README stays the single source (``benchmarks/coverage.py`` writes its
tables); a page includes ``_generated/readme/NAME.md``. Links relative to the
repository are rewritten for the site: a tutorial goes to its rendered page,
any other file is named as code (the site has no copy of it).
"""
import re
from pathlib import Path
from typing import Dict, Set

from sphinx.util import logging

from .files import write_if_changed

logger = logging.getLogger(__name__)

_START = re.compile(r"^<!-- ([\w ]+?)(?::.*)? -->\s*$")
_LINK = re.compile(r"(!?)\[([^\]]*)\]\(([^)\s]+)\)")


def sections(text: str) -> Dict[str, str]:
    """Every marked section of ``text`` by name (``"coverage"``, ``"timm coverage"``)."""
    found, lines = {}, text.splitlines()
    for start, line in enumerate(lines):
        match = _START.match(line)
        if not match:
            continue
        name = match.group(1)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].strip() == f"<!-- /{name} -->"), None)
        if end is not None:
            found[name] = "\n".join(lines[start + 1 : end]).strip() + "\n"
    return found


def _rewrite_link(match: re.Match) -> str:
    bang, text, target = match.groups()
    if re.match(r"^[a-z]+://|^#|^mailto:", target):
        return match.group(0)
    path = target.split("#")[0]
    if path.startswith("tutorials/") and path.endswith(".ipynb"):
        return f"[{text}](/_generated/run/tutorials/{Path(path).stem}.ipynb)"
    if bang:  # an image of the repository, which is two folders above the site's sources
        return f"![{text}](/../../{path})"
    return f"{text} (`{path}`)"


def for_site(section: str) -> str:
    """``section`` with its repository-relative links rewritten."""
    return _LINK.sub(_rewrite_link, section)


SLUG = re.compile(r"[^a-z0-9]+")


def file_name(name: str) -> str:
    return SLUG.sub("-", name.lower()).strip("-") + ".md"


def write_sections(readme: Path, folder: Path) -> Set[Path]:
    """Write each marked section of ``readme`` to ``folder/<name>.md``."""
    found = sections(readme.read_text(encoding="utf-8"))
    if not found:
        logger.warning(f"{readme} has no <!-- name --> ... <!-- /name --> sections", type="captum_graph")
    return {write_if_changed(folder / file_name(name), for_site(body)) for name, body in found.items()}
