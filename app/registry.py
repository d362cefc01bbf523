"""The router registry: built-in routers shipped with the library plus routers trained through the API.

Trained routers live in the artifact store as `routers/<id>.safetensors`; their metadata (model,
scheduler, steps, training config, measured quality) is read from the file header, without torch.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harmonica_core.catalog import builtin_routers, read_router_metadata

log = logging.getLogger("harmonica.registry")
ROUTER_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,95}$")


@dataclass(frozen=True)
class RouterEntry:
    id: str
    path: Path
    builtin: bool
    metadata: dict[str, Any]

    @property
    def model(self) -> str:
        return self.metadata.get("model_name", "")

    @property
    def scheduler(self) -> str:
        return self.metadata.get("training", {}).get("scheduler", "")

    @property
    def steps(self) -> int:
        return int(self.metadata["target"]["steps"])

    @property
    def method(self) -> str:
        return self.metadata.get("quality", {}).get("method", "harmonica")

    def summary(self) -> dict[str, Any]:
        training = self.metadata.get("training", {})
        return {
            "id": self.id,
            "builtin": self.builtin,
            "model": self.model,
            "scheduler": self.scheduler,
            "steps": self.steps,
            "method": self.method,
            "objective": training.get("objective"),
            "threshold": self.metadata.get("threshold"),
            "branches": len(self.metadata["target"]["branch_layout"]),
            "quality": self.metadata.get("quality", {}),
            "training": training,
            "created_at": self.path.stat().st_mtime,
        }


def trained_router_id(name: str | None, job_id: str) -> str:
    """Deterministic per job, so a redelivered training job overwrites its own file."""
    slug = re.sub(r"[^a-z0-9]+", "-", (name or "router").lower()).strip("-")[:60] or "router"
    return f"{slug}-{job_id[:12]}"


class RouterRegistry:
    def __init__(self, routers_dir: Path) -> None:
        self.routers_dir = routers_dir

    def _builtin(self) -> dict[str, Path]:
        return {f"builtin-digits-{path.stem.replace('_', '-').lower()}": path for path in builtin_routers().values()}

    def path_for(self, router_id: str) -> Path:
        """Where a trained router with this id is (or will be) stored."""
        if not ROUTER_ID.match(router_id):
            raise ValueError(f"router id {router_id!r} is not valid (lowercase letters, digits and '-')")
        return self.routers_dir / f"{router_id}.safetensors"

    def get(self, router_id: str) -> RouterEntry | None:
        builtin = self._builtin()
        if router_id in builtin:
            return _entry(router_id, builtin[router_id], builtin=True)
        if not ROUTER_ID.match(router_id):
            return None
        path = self.path_for(router_id)
        return _entry(router_id, path, builtin=False) if path.is_file() else None

    def all(self) -> list[RouterEntry]:
        paths = [(router_id, path, True) for router_id, path in self._builtin().items()]
        if self.routers_dir.is_dir():
            paths += [(path.stem, path, False) for path in sorted(self.routers_dir.glob("*.safetensors"))]
        return [entry for entry in (_entry(*args) for args in paths) if entry is not None]


def _entry(router_id: str, path: Path, builtin: bool) -> RouterEntry | None:
    try:
        return RouterEntry(router_id, path, builtin, read_router_metadata(path))
    except (OSError, ValueError) as error:  # a damaged or foreign file must not break the listing
        log.warning("skipping router file %s: %s", path, error)
        return None
