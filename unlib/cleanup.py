"""What the store holds that no current output needs: set-aside damaged files, partial and
temporary files left by interrupted writers whose output is finished or abandoned, and
correlation blocks that their references' merged correlations were not made from."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from pathlib import Path

from unlib.h5read import verified_attrs
from unlib.h5write import partial_path
from unlib.store import being_written, slug

TEMPORARY = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)$")  # unlib.store.atomic_path's
REFUSED = re.compile(r"^(?P<name>.+)\.refused-\d+$")  # unlib.store.set_aside's
BLOCK = re.compile(r"^ref-(?P<refs>[\d-]+)_units-[0-9a-f]+\.h5$")  # unlib.store.Store.correlation_block's
RECENT_SECONDS = 3600  # a temporary file this young may belong to a writer on another host


@dataclasses.dataclass(frozen=True)
class Unused:
    path: Path
    bytes: int
    why: str


def unused_files(root: str | Path) -> list[Unused]:
    """Files under the store `root` that nothing reads again, with why. A file some process is
    writing now (it holds the output's lock, or its temporary file is recent or its writer's
    pid alive) is never listed; a partial file whose output is not finished is kept, since the
    next run resumes it."""
    root = Path(root)
    locks = root / "locks"
    found = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and locks not in p.parents):
        why = None
        if REFUSED.match(path.name):
            why = "set aside as damaged or altered"
        elif (match := TEMPORARY.match(path.name)) and not being_written(path.with_name(match["name"]), locks) \
                and not alive(int(match["pid"])) and time.time() - path.stat().st_mtime > RECENT_SECONDS:
            why = "left by an interrupted write"
        elif path.name.endswith(".partial.h5"):
            final = path.with_name(path.name[:-len(".partial.h5")] + ".h5")
            if partial_path(final) == path and final.exists() and not being_written(final, locks):
                why = "an interrupted write whose file was finished since"
        if why:
            found.append(Unused(path, path.stat().st_size, why))
    return found + orphaned_blocks(root)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def orphaned_blocks(root: Path) -> list[Unused]:
    """Correlation blocks that no merge needs: every reference the block serves has its merged
    per-layer files, none of them being written, and none made from the block (a block of
    another plan: another CORR_MEMORY or PARALLEL). Any doubt (a block or layer file that
    does not read back verified) keeps the block."""
    found = []
    for block in sorted(root.glob("correlation/*/blocks/*.h5")):
        match = BLOCK.match(block.name)
        if not match:
            continue
        try:
            models = json.loads(verified_attrs(block)["provenance"])["models"]
            layer_files = {}
            for ref in map(int, match["refs"].split("-")):
                layer_files[ref] = sorted((block.parent.parent / slug(models[ref])).glob("layer_*.h5"))
            if not all(layer_files.values()) or any(being_written(f, root / "locks")
                                                    for files in layer_files.values() for f in files):
                continue
            used = set()
            for files in layer_files.values():
                for layer_file in files:
                    used |= {root / name for name in json.loads(verified_attrs(layer_file)["made_from"])}
        except Exception:  # noqa: BLE001  damaged, set aside meanwhile, or older: keep the block
            continue
        if block not in used:
            found.append(Unused(block, block.stat().st_size, "a correlation block the merged correlations were not "
                                                              "made from"))
    return found
