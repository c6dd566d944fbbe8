"""Typed errors. Each carries one HTTP status and a stable `code`; one handler renders them all as
`{"error": {"code": ..., "message": ...}}`."""

from __future__ import annotations


class AmendError(Exception):
    status = 500
    code = "internal_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class BadRequest(AmendError):
    status, code = 400, "bad_request"


class InvalidAdapter(AmendError):
    status, code = 400, "invalid_adapter"


class InvalidDataset(AmendError):
    status, code = 400, "invalid_dataset"


class InvalidModel(AmendError):
    status, code = 400, "invalid_model"


class Unauthorized(AmendError):
    status, code = 401, "unauthorized"


class Forbidden(AmendError):
    status, code = 403, "forbidden"


class NotFound(AmendError):
    status, code = 404, "not_found"


class Conflict(AmendError):
    status, code = 409, "conflict"


class PayloadTooLarge(AmendError):
    status, code = 413, "payload_too_large"


class UnsupportedMediaType(AmendError):
    status, code = 415, "unsupported_media_type"


class Unprocessable(AmendError):
    status, code = 422, "validation_error"


class QuotaExceeded(AmendError):
    status, code = 429, "quota_exceeded"


class ServiceUnavailable(AmendError):
    status, code = 503, "service_unavailable"


class StorageUnavailable(ServiceUnavailable):
    code = "storage_unavailable"


class IndexUnavailable(ServiceUnavailable):
    code = "redis_unavailable"
