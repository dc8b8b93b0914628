#!/usr/bin/env python3
"""Print the requirements of one extra of pyproject.toml (base dependencies included, `routenlp[...]` self-references
expanded), one per line: the images install them in a layer of their own BEFORE copying the sources, so a source
edit rebuilds only the thin `pip install --no-deps .` layer, never torch's.

    python scripts/image_requirements.py router > /tmp/requirements.txt
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

SELF = re.compile(r"^routenlp\[([\w,\s]+)\]$")


def requirements(pyproject: dict, extra: str) -> list[str]:
    project = pyproject["project"]
    extras = project.get("optional-dependencies", {})
    out: list[str] = list(project.get("dependencies", []))
    todo, seen = [extra], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        if name not in extras:
            raise SystemExit(f"image_requirements: no extra {name!r} in pyproject.toml (extras: {', '.join(extras)})")
        seen.add(name)
        for req in extras[name]:
            m = SELF.match(req.strip())
            if m:
                todo.extend(x.strip() for x in m.group(1).split(","))
            elif req not in out:
                out.append(req)
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    # In an image build the script sits beside pyproject.toml in the working directory; in the repository, one up.
    here = Path("pyproject.toml")
    path = here if here.is_file() else Path(__file__).resolve().parent.parent / "pyproject.toml"
    print("\n".join(requirements(tomllib.loads(path.read_text()), argv[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
