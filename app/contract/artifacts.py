"""The artifact store: job images and grids, and router files, behind one small interface with two backends.

`LocalStore` is a folder (`HARMONICA_ARTIFACTS_DIR`, the default, for `make run` and one host); `S3Store` is an
S3-compatible object store (MinIO, AWS S3, ...) that a gateway and workers on several hosts share. Keys are
`/`-separated paths: `jobs/<job id>/<file>` and `routers/<owner>/<router id>.safetensors`. Workers compute into a
local scratch folder and publish the results here; the gateway serves them, as bytes or as a redirect to a
presigned URL.
"""

from __future__ import annotations

import hashlib
import mimetypes
import os
import re
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

if TYPE_CHECKING:
    from .settings import SettingsBase

# Path segments that are never empty, `.`, `..` or hidden (a local store's temporary files start with a dot).
KEY = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*(?:/[A-Za-z0-9_-][A-Za-z0-9_.-]*)*")
CHUNK = 1 << 16
NOT_FOUND = {"NoSuchKey", "NotFound", "404"}  # what S3 answers for a missing object (HEAD has no body, only 404)


class ArtifactMissing(LookupError):
    """No object under this key."""


class StoreUnavailable(RuntimeError):
    """The store cannot be reached, or refuses the service; the message says what to check."""


@dataclass(frozen=True)
class ArtifactInfo:
    key: str
    size: int
    modified: float  # seconds since the epoch
    etag: str  # changes whenever the content does


def check_key(key: str) -> str:
    if not KEY.fullmatch(key):
        raise ValueError(f"artifact key {key!r} is not a relative path of plain names")
    return key


def check_prefix(prefix: str) -> str:
    """A prefix is a folder: a key followed by `/` (never the whole store)."""
    if not (prefix.endswith("/") and KEY.fullmatch(prefix[:-1])):
        raise ValueError(f"artifact prefix {prefix!r} is not a folder (a relative path ending in '/')")
    return prefix


def content_type(key: str) -> str:
    return mimetypes.guess_type(key)[0] or "application/octet-stream"


class ArtifactStore(ABC):
    """What gateway and workers need of a store. Readers never see half an object: writes replace it whole."""

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None:
        """Store `data` under `key`, replacing any object there."""

    @abstractmethod
    def publish(self, key: str, path: Path) -> None:
        """Move a finished local file (a worker's scratch, on the local store's filesystem) into the store."""

    @abstractmethod
    def info(self, key: str) -> ArtifactInfo | None:
        """The object's size, time and etag; None where there is none."""

    @abstractmethod
    def open(self, key: str) -> tuple[ArtifactInfo, Iterator[bytes]]:
        """The object's info and its content in chunks (to stream), or ArtifactMissing; the request is made now, so
        a missing object or an unreachable store is known before the first chunk."""

    def get_bytes(self, key: str) -> bytes:
        return b"".join(self.open(key)[1])

    @abstractmethod
    def list(self, prefix: str) -> list[ArtifactInfo]:
        """Every object under the folder `prefix`, at any depth."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Delete one object; nothing happens where there is none."""

    @abstractmethod
    def delete_prefix(self, prefix: str) -> None:
        """Delete every object under the folder `prefix`."""

    @abstractmethod
    def local_path(self, key: str) -> Path:
        """A file on this host with the object's content, for code that reads paths (torch loading a router): the
        object itself in a local store, a cached download of this version of it in a remote one."""

    def url(self, key: str, seconds: int, filename: str | None = None) -> str | None:
        """A URL that GETs the object without credentials for `seconds` (saved as `filename`); None where the store
        has no URLs of its own (the local folder)."""
        return None


@dataclass(frozen=True)
class LocalStore(ArtifactStore):
    """A folder. Each write goes to a hidden temporary file beside its target and is renamed into place. Equal for
    equal folders, so caches keyed by the store (the registry's metadata) outlive one request's instance."""

    root: Path

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def put_bytes(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(handle, "wb") as file:
                file.write(data)
            os.replace(temporary, path)
        finally:
            Path(temporary).unlink(missing_ok=True)

    def publish(self, key: str, path: Path) -> None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)  # a no-op where the scratch file already is the target (jobs/<id>/ is both)

    def _info(self, key: str, stat: os.stat_result) -> ArtifactInfo:
        return ArtifactInfo(key, stat.st_size, stat.st_mtime, f"{stat.st_mtime_ns:x}-{stat.st_size:x}")

    def info(self, key: str) -> ArtifactInfo | None:
        path = self._path(key)
        return self._info(key, path.stat()) if path.is_file() else None

    def open(self, key: str) -> tuple[ArtifactInfo, Iterator[bytes]]:
        try:
            file = self._path(key).open("rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ArtifactMissing(key) from None
        return self._info(key, os.fstat(file.fileno())), _chunks(file)

    def list(self, prefix: str) -> list[ArtifactInfo]:
        found = []
        for folder, folders, files in os.walk(self.root / check_prefix(prefix)):
            folders[:] = [name for name in folders if not name.startswith(".")]
            for name in files:
                if name.startswith("."):
                    continue
                path = Path(folder, name)
                try:
                    found.append(self._info(path.relative_to(self.root).as_posix(), path.stat()))
                except FileNotFoundError:  # deleted while listed
                    continue
        return sorted(found, key=lambda item: item.key)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> None:
        shutil.rmtree(self.root / check_prefix(prefix), ignore_errors=True)

    def local_path(self, key: str) -> Path:
        path = self._path(key)
        if not path.is_file():
            raise ArtifactMissing(key)
        return path


class S3Store(ArtifactStore):
    """A bucket of an S3-compatible store, every key under `prefix`. Local copies (`local_path`) go to
    `cache_dir`, one file per object version, so a changed object is fetched again."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        endpoint_url: str = "",
        public_endpoint_url: str = "",
        region: str = "us-east-1",
        access_key_id: str = "",
        secret_access_key: str = "",
        cache_dir: Path = Path("var/artifacts/cache"),
    ) -> None:
        folder = prefix.strip("/")
        self.bucket, self.prefix, self.cache_dir = bucket, check_prefix(folder + "/") if folder else "", cache_dir
        self.where = f"bucket {bucket!r} at {endpoint_url or 'AWS S3'}"
        session = boto3.session.Session(
            aws_access_key_id=access_key_id or None,  # None: boto3's own chain (AWS_* variables, instance role)
            aws_secret_access_key=secret_access_key or None,
            region_name=region,
        )
        config = Config(
            signature_version="s3v4",
            connect_timeout=5,
            read_timeout=30,
            retries={"max_attempts": 3, "mode": "standard"},
            # MinIO and other self-hosted stores answer at one host name, the bucket in the path.
            s3={"addressing_style": "path" if endpoint_url else "auto"},
            # Checksums only where the API requires one: many S3-compatible stores reject the newer defaults.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        self.client = session.client("s3", endpoint_url=endpoint_url or None, config=config)
        # Presigned URLs are signed for the host clients use, which may differ from the one the service reaches.
        public = public_endpoint_url or endpoint_url
        self.signer = session.client("s3", endpoint_url=public or None, config=config)

    @contextmanager
    def _errors(self, key: str = "") -> Iterator[None]:
        """boto3's errors as the store's: a missing object, or an unavailable store with what to check."""
        try:
            yield
        except ClientError as error:
            code = str(error.response.get("Error", {}).get("Code", ""))
            if code in NOT_FOUND:
                raise ArtifactMissing(key) from None
            hint = {"NoSuchBucket": "create the bucket (compose's minio-init does) or fix HARMONICA_S3_BUCKET"}.get(
                code, "check HARMONICA_S3_ACCESS_KEY_ID, HARMONICA_S3_SECRET_ACCESS_KEY and the bucket's policy"
            )
            raise StoreUnavailable(f"the object store ({self.where}) refused: {error}; {hint}") from error
        except BotoCoreError as error:
            hint = "check that it runs and that HARMONICA_S3_ENDPOINT_URL reaches it"
            raise StoreUnavailable(f"the object store ({self.where}) is unavailable: {error}; {hint}") from error

    def _put(self, key: str, body: bytes | IO[bytes]) -> None:
        with self._errors(key):
            self.client.put_object(
                Bucket=self.bucket, Key=self.prefix + check_key(key), Body=body, ContentType=content_type(key)
            )

    def put_bytes(self, key: str, data: bytes) -> None:
        self._put(key, data)

    def publish(self, key: str, path: Path) -> None:
        with path.open("rb") as file:
            self._put(key, file)
        path.unlink()

    def _info(self, key: str, size: int, modified: Any, etag: str) -> ArtifactInfo:
        return ArtifactInfo(key, size, modified.timestamp(), etag.strip('"'))

    def info(self, key: str) -> ArtifactInfo | None:
        try:
            with self._errors(key):
                head = self.client.head_object(Bucket=self.bucket, Key=self.prefix + check_key(key))
        except ArtifactMissing:
            return None
        return self._info(key, head["ContentLength"], head["LastModified"], head["ETag"])

    def open(self, key: str) -> tuple[ArtifactInfo, Iterator[bytes]]:
        with self._errors(key):
            got = self.client.get_object(Bucket=self.bucket, Key=self.prefix + check_key(key))
        info = self._info(key, got["ContentLength"], got["LastModified"], got["ETag"])
        return info, _chunks(got["Body"])

    def list(self, prefix: str) -> list[ArtifactInfo]:
        found = []
        with self._errors():
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.prefix + check_prefix(prefix)
            )
            for page in pages:
                for item in page.get("Contents", []):
                    key = item["Key"][len(self.prefix) :]
                    found.append(self._info(key, item["Size"], item["LastModified"], item["ETag"]))
        return found

    def delete(self, key: str) -> None:
        with self._errors(key):
            self.client.delete_object(Bucket=self.bucket, Key=self.prefix + check_key(key))

    def delete_prefix(self, prefix: str) -> None:
        # One DELETE per object: the batch call needs a checksum header not every S3-compatible store accepts, and
        # a prefix here is one job's few files.
        for item in self.list(prefix):
            self.delete(item.key)

    def local_path(self, key: str) -> Path:
        info = self.info(key)
        if info is None:
            raise ArtifactMissing(key)
        path = self._cached(key, info.etag)
        if path.is_file():
            return path
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        got, chunks = self.open(key)
        handle, temporary = tempfile.mkstemp(dir=self.cache_dir, prefix=".download-")
        try:
            with os.fdopen(handle, "wb") as file:
                for chunk in chunks:
                    file.write(chunk)
            path = self._cached(key, got.etag)  # the version fetched, should it have changed since the look
            os.replace(temporary, path)
        finally:
            Path(temporary).unlink(missing_ok=True)
        return path

    def _cached(self, key: str, etag: str) -> Path:
        name = hashlib.sha256(f"{self.bucket}/{self.prefix}{key}\0{etag}".encode()).hexdigest()[:40]
        return self.cache_dir / (name + Path(key).suffix)

    def url(self, key: str, seconds: int, filename: str | None = None) -> str:
        params = {"Bucket": self.bucket, "Key": self.prefix + check_key(key)}
        if filename is not None:
            params["ResponseContentDisposition"] = f'attachment; filename="{filename}"'
        with self._errors(key):
            return self.signer.generate_presigned_url("get_object", Params=params, ExpiresIn=seconds)


def _chunks(body: IO[bytes]) -> Iterator[bytes]:
    try:
        while chunk := body.read(CHUNK):
            yield chunk
    finally:
        body.close()


def open_store(settings: SettingsBase) -> ArtifactStore:
    """The store `HARMONICA_ARTIFACT_STORE` chooses. An S3 store is made once per process and configuration: its
    client is costly to make, and must not cross a fork into a worker's pool children."""
    if settings.artifact_store == "local":
        return LocalStore(settings.artifacts_dir)
    return _s3_store(
        os.getpid(),
        settings.s3_bucket,
        settings.s3_prefix,
        settings.s3_endpoint_url,
        settings.s3_public_endpoint_url,
        settings.s3_region,
        settings.s3_access_key_id,
        settings.s3_secret_access_key.get_secret_value(),
        settings.artifacts_dir / "cache",
    )


@lru_cache(maxsize=8)
def _s3_store(pid: int, *args: Any) -> S3Store:
    return S3Store(*args)
