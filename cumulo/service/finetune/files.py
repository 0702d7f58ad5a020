"""Uploaded files: the bytes under `<data dir>/files/`, one file each named by its id, the metadata in the
`files` table. A file belongs to the organisation that uploaded it; any other sees a 404, as if it did not
exist. Fine-tuning files are checked line by line at upload (each non-empty line one JSON object), so a
broken file is refused at once; what a line means is checked later against the model's tokenizer, by the worker.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time
from pathlib import Path
from typing import IO, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from cumulo.errors import InvalidRequest, NotFound
from cumulo.service.api.errors import BadParameter
from cumulo.service.finetune.tables import StoredFile

PURPOSES = ("fine-tune",)  # what a file may be uploaded for here; results are written as "fine-tune-results"
MAX_FILENAME = 256


def new_file_id() -> str:
    return "file-" + secrets.token_hex(12)


def check_jsonl(path: Path) -> None:
    """Raises BadParameter naming the first line that is not one JSON object; an empty file is refused too."""
    lines = 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                value = json.loads(raw)
            except (UnicodeDecodeError, ValueError):
                raise BadParameter("file", f"line {number}: not valid JSON") from None
            if not isinstance(value, dict):
                raise BadParameter("file", f"line {number}: each line must be a JSON object") from None
            lines += 1
    if lines == 0:
        raise BadParameter("file", "the file holds no examples (one JSON object per line)")


def store(
    session: Session,
    directory: Path,
    org_id: int,
    purpose: str,
    filename: str,
    data: IO[bytes],
    max_bytes: int,
) -> StoredFile:
    """Copies the upload next to the others and records it. The row is only written once the bytes are
    complete and checked, so a file the API lists is always whole."""
    if purpose not in PURPOSES:
        raise BadParameter(
            "purpose", f"purpose {purpose!r} is not supported here; use one of {', '.join(PURPOSES)}"
        )
    filename = os.path.basename(filename or "upload.jsonl")[:MAX_FILENAME] or "upload.jsonl"
    directory.mkdir(parents=True, exist_ok=True)
    file_id = new_file_id()
    path = directory / file_id
    partial = directory / f".{file_id}.partial"
    try:
        with open(partial, "wb") as out:
            size = _copy(data, out, max_bytes)
        check_jsonl(partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    row = StoredFile(
        file_id=file_id,
        org_id=org_id,
        purpose=purpose,
        filename=filename,
        bytes=size,
        path=str(path),
        created_at=time.time(),
    )
    session.add(row)
    session.flush()
    return row


def _copy(data: IO[bytes], out: IO[bytes], max_bytes: int) -> int:
    size = 0
    while chunk := data.read(1 << 20):
        size += len(chunk)
        if size > max_bytes:
            raise InvalidRequest(f"the file is larger than {max_bytes} bytes")
        out.write(chunk)
    return size


def get(session: Session, org_id: int, file_id: str) -> StoredFile:
    row = session.scalar(
        select(StoredFile).where(
            StoredFile.file_id == file_id, StoredFile.org_id == org_id, StoredFile.deleted_at.is_(None)
        )
    )
    if row is None:
        raise NotFound(f"no file with id {file_id!r}")
    return row


def page(
    session: Session, org_id: int, *, purpose: str | None, after: str | None, limit: int, newest_first: bool
) -> tuple[list[StoredFile], bool]:
    query = select(StoredFile).where(StoredFile.org_id == org_id, StoredFile.deleted_at.is_(None))
    if purpose is not None:
        query = query.where(StoredFile.purpose == purpose)
    if after is not None:
        cursor = get(session, org_id, after).id
        query = query.where(StoredFile.id < cursor if newest_first else StoredFile.id > cursor)
    order = StoredFile.id.desc() if newest_first else StoredFile.id.asc()
    rows = list(session.scalars(query.order_by(order).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def delete(session: Session, org_id: int, file_id: str) -> StoredFile:
    """Forgets the file and removes its bytes; a job that still needs it fails with an error naming it."""
    row = get(session, org_id, file_id)
    row.deleted_at = time.time()
    Path(row.path).unlink(missing_ok=True)
    return row


def view(row: StoredFile) -> dict[str, Any]:
    """OpenAI's `file` object (openai/types/file_object.py)."""
    return {
        "id": row.file_id,
        "object": "file",
        "bytes": row.bytes,
        "created_at": int(row.created_at),
        "filename": row.filename,
        "purpose": row.purpose,
        "status": "processed",
        "expires_at": None,
        "status_details": None,
    }


def remove_tree(path: str | None) -> None:
    if path:
        shutil.rmtree(path, ignore_errors=True)
