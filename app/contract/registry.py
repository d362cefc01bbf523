"""The router registry: built-in routers shipped with the library plus routers trained through the API.

A trained router belongs to the API key that trained it: it lives in the artifact store (`app.contract.artifacts`)
as `routers/<owner>/<id>.safetensors`, and a registry opened for one owner sees the built-in routers and
that owner's only. Metadata (model, scheduler, steps, training config, measured quality) is read from
the file header, without torch.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

from harmonica_core.catalog import builtin_routers, read_router_metadata, read_safetensors_header
from harmonica_core.validation import RouterInfo

from .artifacts import ArtifactInfo, ArtifactMissing, ArtifactStore

log = logging.getLogger("harmonica.registry")
ROUTER_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,95}")
# An API key's name owns its jobs and names its router folder (`routers/<name>/`): never `.`, `..` or hidden.
KEY_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}")


@dataclass(frozen=True)
class RouterEntry:
    id: str
    metadata: dict[str, Any]
    created_at: float
    file: Path | None = None  # a built-in router: its file in the package
    key: str | None = None  # one of the owner's: its key in the artifact store

    @property
    def builtin(self) -> bool:
        return self.key is None

    @cached_property
    def info(self) -> RouterInfo:
        """What it was trained for (model, scheduler, steps, method, threshold), as the core reads it."""
        return RouterInfo.from_metadata(self.id, self.metadata)

    @property
    def model(self) -> str:
        return self.info.model

    def local_file(self, store: ArtifactStore) -> Path:
        """A file on this host with the router, for the torch side (harmonica_core loads routers from paths)."""
        return self.file if self.file is not None else store.local_path(str(self.key))

    def summary(self) -> dict[str, Any]:
        training = self.metadata.get("training", {})
        return {
            "id": self.id,
            "builtin": self.builtin,
            "model": self.info.model,
            "scheduler": self.info.scheduler,
            "steps": self.info.steps,
            "method": self.info.method,
            "objective": training.get("objective"),
            "threshold": self.info.threshold,
            "branches": len(self.metadata["target"]["branch_layout"]),
            "quality": self.metadata.get("quality", {}),
            "training": training,
            "created_at": self.created_at,
        }

    def detail(self) -> dict[str, Any]:
        """The summary, with the branch names and the plan at the router's threshold (for the heatmap)."""
        layout = self.metadata["target"]["branch_layout"]
        return self.summary() | {"branch_layout": layout, "plan": self.metadata.get("plan", [])}


def trained_router_id(name: str | None, job_id: str) -> str:
    """Deterministic per job, so a redelivered training job overwrites its own file; a hash of the job id, not
    the id itself, since router ids get quoted and shared while a job id stays its key's."""
    slug = re.sub(r"[^a-z0-9]+", "-", (name or "router").lower()).strip("-")[:60] or "router"
    return f"{slug}-{hashlib.sha256(job_id.encode()).hexdigest()[:12]}"


class RouterRegistry:
    """The routers one owner (an API key's name) may use: the built-in ones and those it trained or uploaded."""

    def __init__(self, store: ArtifactStore, owner: str) -> None:
        if not KEY_NAME.fullmatch(owner):  # the owner names a folder: never `..` or a path
            raise ValueError(f"router owner {owner!r} is not a valid API key name")
        self.store, self.prefix = store, f"routers/{owner}/"

    def key_for(self, router_id: str) -> str:
        """Where the owner's trained router with this id is (or will be) stored."""
        if not ROUTER_ID.fullmatch(router_id):
            raise ValueError(f"router id {router_id!r} is not valid (lowercase letters, digits and '-')")
        return f"{self.prefix}{router_id}.safetensors"

    def get(self, router_id: str) -> RouterEntry | None:
        """A built-in router or one of the owner's; None for another owner's, as for an unknown id."""
        builtin = builtin_routers()
        if router_id in builtin:
            return _builtin_entry(router_id, builtin[router_id])
        if not ROUTER_ID.fullmatch(router_id):
            return None
        info = self.store.info(self.key_for(router_id))
        return None if info is None else self._stored(router_id, info)

    def add(self, data: bytes, name: str | None, accept: Callable[[RouterEntry], None]) -> RouterEntry:
        """Store an uploaded router file as the owner's, if `check_router_file` and then `accept` (the caller's
        checks against the served models) pass; raises ValueError saying what is wrong. Its id comes from the
        name and the content, so uploading the same file again gives the same router."""
        router_id = trained_router_id(name, "upload:" + hashlib.sha256(data).hexdigest())
        entry = RouterEntry(router_id, check_router_file(data), time.time(), key=self.key_for(router_id))
        accept(entry)
        self.store.put_bytes(self.key_for(router_id), data)  # in the registry whole, or not at all
        return entry

    def publish(self, router_id: str, path: Path) -> None:
        """Move a router file a worker wrote into the owner's registry, where it appears whole or not at all."""
        self.store.publish(self.key_for(router_id), path)

    def remove(self, router_id: str) -> None:
        """Delete one of the owner's routers (KeyError: it has none of that id; PermissionError: a built-in)."""
        entry = self.get(router_id)
        if entry is None:
            raise KeyError(router_id)
        if entry.builtin:
            raise PermissionError(router_id)
        self.store.delete(entry.key)

    def all(self) -> list[RouterEntry]:
        """The built-in routers, then the owner's."""
        entries = [_builtin_entry(router_id, path) for router_id, path in builtin_routers().items()]
        for info in self.store.list(self.prefix):
            name = info.key.removeprefix(self.prefix)
            if "/" not in name and name.endswith(".safetensors"):
                entries.append(self._stored(name.removesuffix(".safetensors"), info))
        return [entry for entry in entries if entry is not None]

    def _stored(self, router_id: str, info: ArtifactInfo) -> RouterEntry | None:
        try:
            metadata = _stored_metadata(self.store, info.key, info.etag)
        except (ArtifactMissing, OSError, ValueError) as error:  # deleted meanwhile, damaged or foreign
            log.warning("skipping router %s: %s", info.key, error)
            return None
        return RouterEntry(router_id, metadata, info.modified, key=info.key)


@lru_cache(maxsize=1024)
def _stored_metadata(store: ArtifactStore, key: str, etag: str) -> dict[str, Any]:
    """A stored router's metadata, read once per version (etag): a listing then costs one request, not one per
    router, on an object store."""
    return read_router_metadata(store.get_bytes(key))


def check_router_file(data: bytes) -> dict[str, Any]:
    """The metadata of a router file whose header and data agree: HarmoniCa metadata naming its target, and one
    float32 `logits` tensor of steps x branches filling the rest of the file. ValueError says what is wrong."""
    header, start = read_safetensors_header(data)
    metadata = read_router_metadata(data)
    try:
        steps, branches = int(metadata["target"]["steps"]), len(metadata["target"]["branch_layout"])
        RouterInfo.from_metadata("upload", metadata)
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"the router metadata is incomplete ({error!r} is missing or malformed)") from None
    size = steps * branches * 4
    tensors = {name: value for name, value in header.items() if name != "__metadata__"}
    expected = {"logits": {"dtype": "F32", "shape": [steps, branches], "data_offsets": [0, size]}}
    if tensors != expected:
        raise ValueError(f"a router of {steps} steps x {branches} branches holds {expected}, this file {tensors}")
    if len(data) != start + size:
        raise ValueError(f"the file is {len(data)} bytes; its header says {start + size}")
    return metadata


def _builtin_entry(router_id: str, path: Path) -> RouterEntry | None:
    try:
        return RouterEntry(router_id, read_router_metadata(path), path.stat().st_mtime, file=path)
    except (OSError, ValueError) as error:  # a damaged file must not break the listing
        log.warning("skipping router file %s: %s", path, error)
        return None
