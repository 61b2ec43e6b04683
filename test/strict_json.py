"""Reading a JSON file the way JavaScript or jq would, for tests of files other tools read."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_strict_json(path: Path) -> Any:
    """The file's JSON; an error naming the file for Python's NaN, Infinity or -Infinity, which
    strict readers refuse."""

    def refuse(constant: str) -> None:
        raise ValueError(f"{path}: {constant} is not JSON")

    return json.loads(Path(path).read_text(encoding="utf-8"), parse_constant=refuse)
