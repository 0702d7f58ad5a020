"""The one exception hierarchy of Cumulo.

Every error a user can cause is a `CumuloError` whose message is one readable line. The CLI prints it and exits
non-zero; the HTTP layer maps it to OpenAI's error JSON using `status`, `type` and `code`.
"""

from __future__ import annotations


class CumuloError(Exception):
    """Base class. `status`/`type`/`code` shape the OpenAI-style error when it crosses HTTP."""

    status: int = 500
    type: str = "server_error"
    code: str | None = None


# -- bad input -----------------------------------------------------------------------------------------------
class InvalidRequest(CumuloError):
    status = 400
    type = "invalid_request_error"


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


class ModelNotFound(CumuloError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class InvalidModel(CumuloError):
    """A file or directory that is not a model Cumulo can load."""

    status = 400
    type = "invalid_request_error"
    code = "invalid_model"


class UnsupportedArchitecture(InvalidModel):
    code = "unsupported_architecture"


class FormatError(InvalidRequest):
    """Unknown number format, non-finite weights, shapes a block scheme cannot take."""

    code = "invalid_format"


class ChipNotFound(CumuloError):
    status = 404
    type = "invalid_request_error"
    code = "chip_not_found"


class DownloadError(CumuloError):
    """A model package could not be fetched or failed its checksum."""

    status = 502
    code = "download_failed"


# -- the service ---------------------------------------------------------------------------------------------
class AuthenticationError(CumuloError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class PermissionDenied(CumuloError):
    status = 403
    type = "invalid_request_error"
    code = "permission_denied"


class NotFound(CumuloError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class Conflict(CumuloError):
    status = 409
    type = "invalid_request_error"
    code = "conflict"


class RateLimited(CumuloError):
    status = 429
    type = "requests"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class QuotaExceeded(CumuloError):
    status = 429
    type = "insufficient_quota"
    code = "insufficient_quota"


class SealMismatch(CumuloError):
    status = 409
    type = "invalid_request_error"
    code = "model_seal_mismatch"


class EngineOverloaded(CumuloError):
    status = 503
    type = "server_error"
    code = "engine_overloaded"


class EngineUnavailable(CumuloError):
    """The engine serving a model cannot take requests: it shut down, or its worker died."""

    status = 503
    type = "server_error"
    code = "engine_unavailable"
