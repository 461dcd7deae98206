"""Domain errors of the serving path; each carries the gRPC status it maps to.

They are raised where the problem is understood (request validation, the
runtime, the model registry) and translated to a gRPC status once, in
`serving.interceptors.ErrorInterceptor`. The status is held by *name*
(``"INVALID_ARGUMENT"``), so this module and `serving.runtime` never import grpc.
"""
from __future__ import annotations


class ServingError(Exception):
    """Base class: `status` is the name of a `grpc.StatusCode`."""

    status = "INTERNAL"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidRequest(ServingError):
    """The request is malformed or outside the limits; the message names the field."""

    status = "INVALID_ARGUMENT"


class DeadlineExceeded(ServingError):
    """The request's deadline passed between two stages (the stage is named)."""

    status = "DEADLINE_EXCEEDED"


class Overloaded(ServingError):
    """Too many requests in flight: shed instead of queueing past the deadline."""

    status = "RESOURCE_EXHAUSTED"


class NoModelLoaded(ServingError):
    """No model bundle has been loaded yet; health is NOT_SERVING."""

    status = "UNAVAILABLE"


class StateUnavailable(ServingError):
    """The online store (Redis) cannot be reached; the runtime answers degraded instead of raising."""

    status = "UNAVAILABLE"


class ArtifactError(Exception):
    """A model artifact failed validation (checksum, schema, smoke inference); `reason` is a short code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
