"""`/models`: the served models and the routers the caller may use with each."""

from __future__ import annotations

from fastapi import APIRouter

from harmonica_core.catalog import MODELS, ModelInfo

from ..deps import Routers, ServiceDep
from ..errors import JOB_RESPONSES
from ..schemas import ModelOut

router = APIRouter(tags=["routers"])


@router.get("/models", response_model=list[ModelOut], responses=JOB_RESPONSES, summary="List the served models")
def list_models(service: ServiceDep, registry: Routers) -> list[ModelOut]:
    """Models this service runs, with the routers you may use for each."""
    usable = registry.all()
    out = []
    for name in service.settings.model_names:
        info = MODELS.get(name) or ModelInfo("a local diffusers pipeline folder", "unknown")
        facts = {field: getattr(info, field) for field in ("description", "family", "num_classes", "size", "max_size")}
        out.append(ModelOut(id=name, **facts, routers=[r.id for r in usable if r.model == name]))
    return out
