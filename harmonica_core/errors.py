"""The error every entry point turns into its own answer (a 422 problem naming the field, or a CLI line and
exit 2). Torch-free and import-free, so the cache methods and the request validation can both raise it."""

from __future__ import annotations


class InvalidRequest(ValueError):
    """A request the caller must change; `field` is its dotted name in the API's request body (a cache
    method's check names just the parameter; validation places it under `acceleration.`)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class RankFailed(RuntimeError):
    """A process of a distributed training run died or failed, and torchrun stopped the others; the checkpoint
    stays, so a rerun of the same command resumes from it."""
