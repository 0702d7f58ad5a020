"""/console/api/... routes of the operator pages (engineer B's module; this is the empty router it starts from)."""

from __future__ import annotations

from fastapi import APIRouter

ops_router = APIRouter(prefix="/console/api")
