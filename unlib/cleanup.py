"""What the store holds that no current output needs: set-aside damaged files, partial and
temporary files left by interrupted writers whose output is finished or abandoned, and
correlation blocks that their run's merged correlations were not made from."""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

from unlib.h5io import h5_attribute, partial_path
from unlib.store import being_written

TEMPORARY = re.compile(r"^\.(?P<name>.+)\.tmp-\d+$")  # unlib.store.atomic_path's
REFUSED = re.compile(r"^(?P<name>.+)\.refused-\d+$")  # unlib.store.set_aside's


@dataclasses.dataclass(frozen=True)
class Unused:
    path: Path
    bytes: int
    why: str


def unused_files(root: str | Path) -> list[Unused]:
    """Files under the store `root` that nothing reads again, with why. A file some process is
    writing now (it holds the output's lock) is never listed; a partial file whose output is
    not finished is kept, since the next run resumes it."""
    root = Path(root)
    locks = root / "locks"
    found = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and locks not in p.parents):
        why = None
        if REFUSED.match(path.name):
            why = "set aside as damaged or altered"
        elif (match := TEMPORARY.match(path.name)) and not being_written(path.with_name(match["name"]), locks):
            why = "left by an interrupted write"
        elif path.name.endswith(".partial.h5"):
            final = path.with_name(path.name[:-len(".partial.h5")] + ".h5")
            if partial_path(final) == path and final.exists() and not being_written(final, locks):
                why = "an interrupted write whose file was finished since"
        if why:
            found.append(Unused(path, path.stat().st_size, why))
    return found + orphaned_blocks(root)


def orphaned_blocks(root: Path) -> list[Unused]:
    """Correlation blocks of runs whose merged per-layer files exist but were not made from them
    (blocks of another plan: another CORR_MEMORY or PARALLEL)."""
    found = []
    for blocks in sorted(root.glob("correlation/*/blocks")):
        layer_files = sorted(blocks.parent.glob("*/layer_*.h5"))
        if not layer_files:  # not merged yet: every block may still be needed
            continue
        try:
            records = [h5_attribute(layer_file, "made_from") for layer_file in layer_files]
        except OSError:  # a damaged layer file: the run rebuilds it, from its blocks
            continue
        if None in records:  # written before files recorded what they were made from
            continue
        used = {root / name for record in records for name in json.loads(record)}
        for block in sorted(blocks.glob("*.h5")):
            if block not in used and not block.name.endswith(".partial.h5"):
                found.append(Unused(block, block.stat().st_size, "a correlation block the merged correlations were "
                                                                  "not made from"))
    return found
