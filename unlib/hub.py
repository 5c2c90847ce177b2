"""The Hugging Face hub: whether it can be reached (asked once per process, quickly), and
the commands that fetch what a run needs from it on a connected machine."""
from __future__ import annotations

import functools
import os
import socket
import sys
import urllib.parse

PROBE_SECONDS = 3.0  # how long one connection to the hub may take before it counts as unreachable
TRUE_VALUES = ("1", "true", "yes", "on")  # huggingface_hub's spelling of a set flag


@functools.cache
def offline_unless_reachable() -> bool:
    """Whether the hub is used. Unless HF_HUB_OFFLINE is set, one TCP connection to the hub
    (HF_ENDPOINT) is tried; where none opens within PROBE_SECONDS, offline mode is set for the
    rest of the process and the workers it forks, so every hub call answers at once from the
    local cache instead of retrying for half a minute (as huggingface_hub does per call)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in TRUE_VALUES:
        return False
    endpoint = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=PROBE_SECONDS).close()
        return True
    except OSError:
        go_offline()
        return False


def go_offline() -> None:
    """Offline mode for the hub libraries, also those already imported (they read it once)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    for module, flags in (("huggingface_hub.constants", ("HF_HUB_OFFLINE",)),
                          ("datasets.config", ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))):
        if module in sys.modules:
            for flag in flags:
                setattr(sys.modules[module], flag, True)


def model_download(source: str, revision: str | None) -> str:
    """The command that puts a hub model (at a revision) into the local cache."""
    return f"hf download {source}" + (f" --revision {revision}" if revision else "")


def dataset_download(name: str) -> str:
    """The command that puts a hub dataset into the local cache."""
    return f"hf download --repo-type dataset {name}"


def fetch_advice(commands: list[str]) -> str:
    """What to run on a connected machine, every command once, in one line."""
    unique = list(dict.fromkeys(commands))
    return ("on a machine that reaches the hub run " + "; ".join(f"`{c}`" for c in unique)
            + " and copy its Hugging Face cache (~/.cache/huggingface) here")
