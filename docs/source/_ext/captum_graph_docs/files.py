"""Writing generated files without touching unchanged ones (Sphinx rebuilds what changed)."""
from pathlib import Path
from typing import Union


def write_if_changed(path: Path, content: Union[str, bytes]) -> Path:
    """Write ``content`` to ``path`` unless it already holds it; return ``path``."""
    data = content.encode() if isinstance(content, str) else content
    if not path.exists() or path.read_bytes() != data:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return path
