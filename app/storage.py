"""The one storage path: S3 through boto3 (AWS, SeaweedFS, MinIO, Ceph).

- Every write carries a SHA-256 checksum that the server verifies; large objects go up in multipart parts,
  read from a stream, so nothing is held whole in memory.
- Publish by final PUT: an S3 object becomes visible only when its PUT (or CompleteMultipartUpload)
  succeeds, and a multi-object artifact (an adapter, a job result) becomes visible only when its record —
  always written last — exists. A failed multipart upload is aborted; a failed artifact is deleted.
- Keys are built from ids only (see `keys`), never from user-supplied names.
- Connection failures surface as `StorageUnavailable` (HTTP 503).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from botocore.exceptions import ConnectionError as BotoConnectionError

from app.errors import BadRequest, NotFound, StorageUnavailable
from app.settings import Settings

log = logging.getLogger(__name__)

_UNAVAILABLE = (BotoConnectionError, BotoCoreError)
PART_THREADS = 4  # multipart parts uploaded side by side (the server hashes each: it uses the second core)


class keys:
    """Object keys, from ids only."""

    @staticmethod
    def adapter(tenant: str, adapter_id: str, name: str = "") -> str:
        return f"tenants/{tenant}/adapters/{adapter_id}/{name}"

    @staticmethod
    def job(tenant: str, job_id: str, name: str = "") -> str:
        return f"tenants/{tenant}/jobs/{job_id}/{name}"

    @staticmethod
    def dataset(tenant: str, dataset_id: str, name: str = "") -> str:
        return f"tenants/{tenant}/datasets/{dataset_id}/{name}"

    @staticmethod
    def model(tenant: str, model_id: str, name: str = "") -> str:
        return f"tenants/{tenant}/models/{model_id}/{name}"

    @staticmethod
    def upload(tenant: str, upload_id: str, name: str = "") -> str:
        """A presigned upload's record and staged files (`app/upload_sessions.py`)."""
        return f"tenants/{tenant}/uploads/{upload_id}/{name}"


def sha256_b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode()


class Storage:
    def __init__(self, settings: Settings) -> None:
        self.bucket = settings.s3_bucket
        self._chunk = settings.s3_multipart_chunk
        self._threshold = settings.s3_multipart_threshold
        self.client = boto3.session.Session().client(
            "s3",
            endpoint_url=settings.s3_endpoint_url,
            region_name=settings.s3_region,
            aws_access_key_id=settings.s3_access_key_id.get_secret_value(),
            aws_secret_access_key=settings.s3_secret_access_key.get_secret_value(),
            config=Config(
                connect_timeout=settings.s3_connect_timeout,
                read_timeout=settings.s3_read_timeout,
                retries={"max_attempts": settings.s3_max_attempts, "mode": "standard"},
                s3={"addressing_style": "path"},
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        )

    # -- health and setup ---------------------------------------------------------------------------
    def ping(self) -> None:
        with _translate():
            self.client.head_bucket(Bucket=self.bucket)

    def ensure_bucket(self) -> None:
        with _translate():
            try:
                self.client.head_bucket(Bucket=self.bucket)
            except ClientError as error:
                if _status(error) not in (404, 400, 403):
                    raise
                self.client.create_bucket(Bucket=self.bucket)

    # -- writes -------------------------------------------------------------------------------------
    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> str:
        """Write a small object with a server-verified SHA-256; returns the hex digest."""
        digest = hashlib.sha256(data).digest()
        with _translate():
            self.client.put_object(
                Bucket=self.bucket,
                Key=key,
                Body=data,
                ContentType=content_type,
                ChecksumSHA256=sha256_b64(digest),
            )
        return digest.hex()

    def put_json(self, key: str, value: Any) -> None:
        self.put_bytes(key, json.dumps(value, separators=(",", ":"), default=str).encode(), "application/json")

    def put_file(self, key: str, source: IO[bytes], content_type: str = "application/octet-stream") -> str:
        """Stream a file object up: one PUT when small, multipart with per-part SHA-256 when large (parts sent
        side by side, the whole SHA-256 computed in order as they are read).

        Returns the hex SHA-256 of the whole object. A failed multipart upload is aborted, so no part of it
        is ever visible.
        """
        first = source.read(self._threshold)
        if len(first) < self._threshold:
            return self.put_bytes(key, first, content_type)
        whole = hashlib.sha256()
        with _translate():
            upload = self.client.create_multipart_upload(
                Bucket=self.bucket, Key=key, ContentType=content_type, ChecksumAlgorithm="SHA256"
            )
        upload_id = upload["UploadId"]

        def send(number: int, chunk: bytes) -> dict[str, Any]:
            part_digest = sha256_b64(hashlib.sha256(chunk).digest())
            with _translate():
                response = self.client.upload_part(
                    Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=chunk,
                    ChecksumSHA256=part_digest,
                )
            return {"PartNumber": number, "ETag": response["ETag"], "ChecksumSHA256": part_digest}

        pending: list[Future[dict[str, Any]]] = []
        try:
            # parts go up side by side while the next ones are read and hashed in order; at most
            # `PART_THREADS` + 1 chunks are in memory
            with ThreadPoolExecutor(max_workers=PART_THREADS, thread_name_prefix="amend-part") as pool:
                parts: list[dict[str, Any]] = []
                chunk, number = first, 1
                while chunk:
                    whole.update(chunk)
                    if len(pending) >= PART_THREADS:
                        parts.append(pending.pop(0).result())
                    pending.append(pool.submit(send, number, chunk))
                    number += 1
                    chunk = source.read(self._chunk)
                parts += [future.result() for future in pending]
            with _translate():
                self.client.complete_multipart_upload(
                    Bucket=self.bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
                )
        except BaseException:
            for future in pending:
                future.cancel()
            self._abort(key, upload_id)
            raise
        return whole.hexdigest()

    def copy(self, source: str, key: str, content_type: str = "application/octet-stream") -> None:
        """A server-side copy (CopyObject; multipart UploadPartCopy past 5 GiB): no byte passes through here."""
        with _translate():
            self.client.copy(
                {"Bucket": self.bucket, "Key": source}, self.bucket, key,
                ExtraArgs={"ContentType": content_type, "MetadataDirective": "REPLACE"},
                Config=TransferConfig(multipart_threshold=5 * 2**30, multipart_chunksize=self._chunk),
            )

    def upload_path(self, key: str, path: Path, content_type: str = "application/octet-stream") -> str:
        with path.open("rb") as source:
            return self.put_file(key, source, content_type)

    # -- multipart uploads a client writes through presigned part URLs (app/upload_sessions.py) --------
    def start_multipart(self, key: str, content_type: str = "application/octet-stream") -> str:
        with _translate():
            return str(self.client.create_multipart_upload(
                Bucket=self.bucket, Key=key, ContentType=content_type)["UploadId"])

    def presign_part(self, key: str, upload_id: str, number: int, expires_in: int) -> str:
        """A URL that lets its holder PUT part `number` of this multipart upload, and nothing else."""
        return str(self.client.generate_presigned_url(
            "upload_part",
            Params={"Bucket": self.bucket, "Key": key, "UploadId": upload_id, "PartNumber": number},
            ExpiresIn=expires_in,
        ))

    def finish_multipart(self, key: str, upload_id: str) -> int:
        """Complete a multipart upload from the parts the store holds (listed server-side); returns how many."""
        parts: list[dict[str, Any]] = []
        with _translate():
            paginator = self.client.get_paginator("list_parts")
            for page in paginator.paginate(Bucket=self.bucket, Key=key, UploadId=upload_id):
                parts += [{"PartNumber": p["PartNumber"], "ETag": p["ETag"]} for p in page.get("Parts", [])]
            if parts:
                try:
                    self.client.complete_multipart_upload(
                        Bucket=self.bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
                    )
                except ClientError as error:
                    if _status(error) != 400:  # e.g. EntityTooSmall: a part (not the last) below the minimum
                        raise
                    code = error.response.get("Error", {}).get("Code", "")
                    message = f"the store refused the uploaded parts: {code}"
                    raise BadRequest(message, code="upload_incomplete") from None
        return len(parts)

    def abort_multipart(self, key: str, upload_id: str) -> None:
        self._abort(key, upload_id)

    def _abort(self, key: str, upload_id: str) -> None:
        try:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        except (ClientError, *_UNAVAILABLE):
            log.warning("could not abort multipart upload", extra={"key": key})

    # -- reads --------------------------------------------------------------------------------------
    def get_bytes(self, key: str) -> bytes:
        with _translate():
            body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"]
            return body.read()

    def get_json(self, key: str) -> Any:
        return json.loads(self.get_bytes(key))

    def get_range(self, key: str, start: int, length: int) -> bytes:
        """Bytes `start .. start + length - 1` of an object (fewer at its end), e.g. a safetensors header."""
        return self.get_range_and_size(key, start, length)[0]

    def iter_range(self, key: str, start: int, length: int, piece: int = 1 << 20) -> Iterator[bytes]:
        """Bytes `start .. start + length - 1` of an object, streamed in pieces of `piece` bytes: a large range
        is never one allocation (fresh pages cost as much as the copy), and each piece's memory is reused."""
        return self._stream(key, piece, Range=f"bytes={start}-{start + length - 1}")

    def get_range_and_size(self, key: str, start: int, length: int) -> tuple[bytes, int]:
        """`get_range`, and the whole object's size (from the response's Content-Range)."""
        with _translate():
            response = self.client.get_object(Bucket=self.bucket, Key=key, Range=f"bytes={start}-{start + length - 1}")
            data = response["Body"].read()
        content_range = str(response.get("ContentRange") or "")
        size = content_range.rsplit("/", 1)[-1]
        return data, int(size) if size.isdigit() else int(response["ContentLength"])

    def exists(self, key: str) -> bool:
        try:
            with _translate():
                self.client.head_object(Bucket=self.bucket, Key=key)
        except NotFound:
            return False
        return True

    def size(self, key: str) -> int:
        with _translate():
            return int(self.client.head_object(Bucket=self.bucket, Key=key)["ContentLength"])

    def iter_chunks(self, key: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        """Stream an object down in chunks (for HTTP downloads and a job's inputs)."""
        return self._stream(key, chunk_size)

    def _stream(self, key: str, piece: int, **get_args: str) -> Iterator[bytes]:
        with _translate():
            body = self.client.get_object(Bucket=self.bucket, Key=key, **get_args)["Body"]
        try:
            with _translate():
                yield from body.iter_chunks(piece)
        finally:
            body.close()

    def list_keys(self, prefix: str) -> Iterator[str]:
        paginator = self.client.get_paginator("list_objects_v2")
        with _translate():
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                for item in page.get("Contents", []):
                    yield item["Key"]

    # -- deletes ------------------------------------------------------------------------------------
    def delete_prefix(self, prefix: str) -> int:
        found = list(self.list_keys(prefix))
        with _translate():
            for start in range(0, len(found), 1000):
                batch = [{"Key": k} for k in found[start : start + 1000]]
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
        return len(found)

    def delete(self, key: str) -> None:
        with _translate():
            self.client.delete_object(Bucket=self.bucket, Key=key)


def _status(error: ClientError) -> int:
    return int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


@contextmanager
def _translate() -> Iterator[None]:
    """Map boto errors to typed ones: missing -> NotFound, unreachable or 5xx -> StorageUnavailable."""
    try:
        yield
    except ClientError as error:
        code = error.response.get("Error", {}).get("Code", "")
        if code in ("NoSuchKey", "404", "NotFound", "NoSuchBucket"):
            raise NotFound("object not found") from error
        if _status(error) >= 500:
            raise StorageUnavailable(f"object storage error: {code}") from error
        raise
    except _UNAVAILABLE as error:
        raise StorageUnavailable("object storage is unreachable") from error
