"""Napoleon reads an attribute's or property's docstring ``X: text`` as ``type: description``.

captum_graph's docstrings often open with a sentence that has a colon in it
("The qualified name: module path plus operation"). Here the part before the
colon counts as a type only if it looks like one (``int``, ``Optional[str]``,
``torch.Tensor``, ``str | None``): no spaces outside brackets but around ``|``. Otherwise the line is text.
"""
import re

from sphinx.ext.napoleon.docstring import GoogleDocstring

_BRACKETED = re.compile(r"\[[^\[\]]*\]")
_TYPE = re.compile(r"^[\w.|~`]+$")


def looks_like_type(text: str) -> bool:
    """Whether ``text`` reads as a type annotation rather than words."""
    text = re.sub(r"\s*\|\s*", "|", text.strip())
    while _BRACKETED.search(text):
        text = _BRACKETED.sub("", text)
    return bool(_TYPE.match(text))


_original = GoogleDocstring._consume_inline_attribute


def _consume_inline_attribute(self):
    line = self._lines.get(0)
    if not isinstance(line, str):  # no lines left: napoleon's own handling
        return _original(self)
    before, colon, after = self._partition_field_on_colon(line)
    if colon and after and not looks_like_type(before):
        lines = [self._lines.next(), *self._dedent(self._consume_to_end())]
        return "", self.__class__(lines, self._config).lines()
    return _original(self)


def setup() -> None:
    # reason: napoleon has no option for this; patched on its class for this build process only
    GoogleDocstring._consume_inline_attribute = _consume_inline_attribute
