"""Answers that carry a stored artifact: its bytes, or a redirect to a presigned URL of the object store."""

from __future__ import annotations

from fastapi.responses import RedirectResponse, Response, StreamingResponse

from app.contract.artifacts import ArtifactMissing

from .deps import Service


def stored(
    service: Service, key: str, media_type: str, headers: dict[str, str], filename: str | None = None
) -> Response:
    """The object under `key`, streamed from the store; with HARMONICA_ARTIFACT_REDIRECT and a store that has URLs,
    a 307 to a presigned one instead, so the bytes bypass the gateway. ArtifactMissing where there is none (the
    routes answer 404), StoreUnavailable where the store is away (503, `errors`)."""
    store, settings = service.artifacts, service.settings
    if settings.artifact_redirect:
        if store.info(key) is None:  # a presigned URL of a missing object would only fail at the client
            raise ArtifactMissing(key)
        url = store.url(key, settings.presign_seconds, filename)
        if url is not None:
            return RedirectResponse(url, status_code=307, headers={"Cache-Control": "private, no-store"})
    info, chunks = store.open(key)
    headers = {**headers, "Content-Length": str(info.size), "ETag": f'"{info.etag}"'}
    if filename is not None:
        headers["Content-Disposition"] = f'attachment; filename="{filename}"'
    return StreamingResponse(chunks, media_type=media_type, headers=headers)
