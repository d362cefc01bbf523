"""`/routers`: the built-in routers and the caller's own (trained or uploaded), their files in and out."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import FileResponse

from app.contract.artifacts import ArtifactMissing
from app.contract.registry import RouterEntry

from ..artifacts import stored
from ..deps import Routers, ServiceDep
from ..errors import JOB_RESPONSES, POST_RESPONSES, ApiError
from ..schemas import RouterDetail, RouterOut

router = APIRouter(tags=["routers"])
FILE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"application/octet-stream": {}}},
    307: {"description": "with HARMONICA_ARTIFACT_REDIRECT: the file at a presigned URL of the object store"},
    **JOB_RESPONSES,
}
UPLOAD_BODY = {"content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}


def found(registry: Routers, router_id: str) -> RouterEntry:
    entry = registry.get(router_id)
    if entry is None:
        raise ApiError(404, "Router not found", f"no router {router_id!r}; GET /routers lists them")
    return entry


@router.get("/routers", response_model=list[RouterOut], responses=JOB_RESPONSES, summary="List routers")
def list_routers(registry: Routers, model: str | None = None) -> list[dict[str, Any]]:
    """Built-in routers and your own (trained or uploaded), with what they were trained for and their quality."""
    return [r.summary() for r in registry.all() if model is None or r.model == model]


@router.get("/routers/{router_id}", response_model=RouterDetail, responses=JOB_RESPONSES, summary="Get a router")
def get_router(router_id: str, registry: Routers) -> dict[str, Any]:
    """A built-in router or one of yours, with its plan: which branch computes at which step."""
    return found(registry, router_id).detail()


@router.get("/routers/{router_id}/file", response_class=Response, responses=FILE_RESPONSES, summary="Download a router")
def download_router(router_id: str, service: ServiceDep, registry: Routers) -> Response:
    """The router file (safetensors: the logits and the metadata), as `harmonica generate --router` reads it."""
    entry, filename = found(registry, router_id), f"{router_id}.safetensors"
    if entry.file is not None:  # a built-in one, shipped with the gateway
        return FileResponse(entry.file, media_type="application/octet-stream", filename=filename)
    try:
        return stored(service, str(entry.key), "application/octet-stream", {}, filename)
    except ArtifactMissing:  # deleted since the look
        raise ApiError(404, "Router not found", f"no router {router_id!r}; GET /routers lists them") from None


@router.post(
    "/routers",
    status_code=201,
    response_model=RouterOut,
    responses=POST_RESPONSES,
    openapi_extra={"requestBody": UPLOAD_BODY},
    summary="Upload a router",
)
async def upload_router(
    request: Request,
    service: ServiceDep,
    registry: Routers,
    response: Response,
    name: Annotated[
        str | None, Query(max_length=60, pattern=r"^[A-Za-z0-9][A-Za-z0-9 _.-]*$", description="id prefix")
    ] = None,
) -> dict[str, Any]:
    """Upload a router file (the body, as `harmonica train-router` or `GET /routers/{id}/file` wrote it): it
    becomes yours, usable at once by `/generate`. It must be trained for a served model, and for the weights
    the workers have loaded (their fingerprint); the same file uploaded again is the same router."""
    data = await request.body()
    settings, workers = service.settings, service.store.workers()

    def served(entry: RouterEntry) -> None:
        model = entry.model
        if model not in settings.model_names:
            detail = f"it was trained for {model!r}; this service serves {', '.join(settings.model_names)}"
            raise ApiError(422, "Router for another model", detail)
        loaded = {w["fingerprints"][model] for w in workers.values() if model in w.get("fingerprints", {})}
        if not loaded:
            detail = f"no worker has loaded {model!r} yet, so its weights cannot be compared; retry when /readyz is"
            raise ApiError(503, "Model not loaded", detail, {"Retry-After": "10"})
        if entry.metadata["target"].get("model_fingerprint") not in loaded:
            detail = f"it was trained for other weights of {model!r} than the workers have (fingerprints differ)"
            raise ApiError(422, "Router for other weights", detail)

    try:
        entry = registry.add(data, name, served)
    except ValueError as error:
        raise ApiError(422, "Not a router file", str(error)) from None
    response.headers["Location"] = f"/routers/{entry.id}"
    return entry.summary()


@router.delete("/routers/{router_id}", status_code=204, responses=JOB_RESPONSES, summary="Delete a router")
def delete_router(router_id: str, registry: Routers) -> Response:
    """Delete one of your routers (jobs already running with it are not affected). Built-in ones stay."""
    try:
        registry.remove(router_id)
    except KeyError:
        raise ApiError(404, "Router not found", f"you have no router {router_id!r}; GET /routers lists them") from None
    except PermissionError:
        raise ApiError(409, "Built-in router", f"{router_id!r} is built in and cannot be deleted") from None
    return Response(status_code=204)
