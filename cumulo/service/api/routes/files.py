"""The Files API (OpenAI's /v1/files) for fine-tuning data: upload, list, retrieve, delete, download. Files
belong to the uploader's organisation; another organisation gets a 404 for every one of them."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, File, Form, Path, Query, UploadFile
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool

from cumulo.service.api.deps import Caller, State, only_query
from cumulo.service.finetune import files

router = APIRouter()
FileId = Annotated[str, Path(min_length=1, max_length=64)]


def files_dir(state: Any) -> Any:
    return state.settings.data_dir / "files"


@router.post("/v1/files")
async def upload(
    state: State,
    principal: Caller,
    file: Annotated[UploadFile, File()],
    purpose: Annotated[str, Form(max_length=32)],
) -> dict[str, Any]:
    def write() -> dict[str, Any]:
        with state.sessions() as session, session.begin():
            row = files.store(
                session,
                files_dir(state),
                principal.org_id,
                purpose,
                file.filename or "",
                file.file,
                state.settings.finetune_max_file_bytes,
            )
            return files.view(row)

    return await run_in_threadpool(write)


@router.get("/v1/files", dependencies=[only_query("purpose", "limit", "after", "order")])
async def list_files(
    state: State,
    principal: Caller,
    purpose: Annotated[str | None, Query(max_length=32)] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
    after: Annotated[str | None, Query(max_length=64)] = None,
    order: Literal["asc", "desc"] = "desc",
) -> dict[str, Any]:
    def read() -> dict[str, Any]:
        with state.sessions() as session:
            rows, has_more = files.page(
                session,
                principal.org_id,
                purpose=purpose,
                after=after,
                limit=limit,
                newest_first=order == "desc",
            )
            data = [files.view(r) for r in rows]
        return {
            "object": "list",
            "data": data,
            "has_more": has_more,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
        }

    return await run_in_threadpool(read)


@router.get("/v1/files/{file_id}")
async def retrieve(file_id: FileId, state: State, principal: Caller) -> dict[str, Any]:
    def read() -> dict[str, Any]:
        with state.sessions() as session:
            return files.view(files.get(session, principal.org_id, file_id))

    return await run_in_threadpool(read)


@router.delete("/v1/files/{file_id}")
async def delete(file_id: FileId, state: State, principal: Caller) -> dict[str, Any]:
    def write() -> dict[str, Any]:
        with state.sessions() as session, session.begin():
            row = files.delete(session, principal.org_id, file_id)
            return {"id": row.file_id, "object": "file", "deleted": True}

    return await run_in_threadpool(write)


@router.get("/v1/files/{file_id}/content")
async def content(file_id: FileId, state: State, principal: Caller) -> FileResponse:
    def read() -> tuple[str, str]:
        with state.sessions() as session:
            row = files.get(session, principal.org_id, file_id)
            return row.path, row.filename

    path, filename = await run_in_threadpool(read)
    return FileResponse(path, media_type="application/octet-stream", filename=filename)
