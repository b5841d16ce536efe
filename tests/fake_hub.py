"""A ``huggingface_hub`` stand-in serving a local release folder as a hub repo (no network).

Installed as ``sys.modules["huggingface_hub"]`` by a test, or by a child process of one (``install``): it
records each requested file (``requested``, and one line per file in ``log`` when given), and ``fail``
makes every call raise, as an unreachable or offline hub does.
"""

from __future__ import annotations

import sys
import time
import types
from pathlib import Path


def fake_hub(release: Path, requested: list[str] | None = None, fail: Exception | None = None,
             log: Path | None = None, delay_s: float = 0.0) -> types.SimpleNamespace:
    requested = requested if requested is not None else []

    def list_repo_files(repo_id, revision=None):
        if fail is not None:
            raise fail
        return sorted(str(p.relative_to(release)) for p in release.rglob("*") if p.is_file())

    def hf_hub_download(repo_id, filename, revision=None):
        if fail is not None:
            raise fail
        requested.append(filename)
        if log is not None:
            with open(log, "a") as f:
                f.write(f"{repo_id}@{revision} {filename}\n")
        time.sleep(delay_s)
        return str(release / filename)

    return types.SimpleNamespace(list_repo_files=list_repo_files, hf_hub_download=hf_hub_download,
                                 requested=requested)


def install(release: Path, **kwargs) -> types.SimpleNamespace:
    """Serve ``release`` to every later ``import huggingface_hub`` of this process."""
    hub = fake_hub(release, **kwargs)
    sys.modules["huggingface_hub"] = hub
    return hub
