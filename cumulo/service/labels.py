"""Implicit labels on generated content: who made it (provider, service, model, seal), a content id, the time,
a hash of the text, and an Ed25519 signature over all of it.

The label's `aigc` block uses the metadata field names of GB 45438-2025 (Label, ContentProducer, ProduceID,
ReservedCode1) so a reader of that standard finds what it expects; docs/labels.md explains the mapping.
The signing key lives in the data directory (mode 0600); `verify` needs only the public half.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from cumulo.service.security import write_private

_KEY_FILE = "label_ed25519.pem"
LABEL_VERSION = 1


def canonical(fields: dict[str, Any]) -> bytes:
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def content_sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def load_or_create_signing_key(directory: Path) -> Ed25519PrivateKey:
    path = directory / _KEY_FILE
    if not path.exists():
        directory.mkdir(parents=True, exist_ok=True)
        pem = Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        tmp = path.with_name(f".{_KEY_FILE}.{os.getpid()}.tmp")
        write_private(tmp, pem)
        try:
            os.link(tmp, path)  # fails if another gateway made one first: keep theirs
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    assert isinstance(key, Ed25519PrivateKey)
    return key


@dataclass(slots=True)
class VerifyResult:
    valid: bool
    reason: str


class Labeler:
    def __init__(self, key: Ed25519PrivateKey, provider: str, service: str) -> None:
        self._key = key
        self.public_key: Ed25519PublicKey = key.public_key()
        raw = self.public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.public_key_b64 = base64.b64encode(raw).decode()
        self.key_id = hashlib.sha256(raw).hexdigest()[:16]
        self.provider = provider
        self.service = service

    def label(self, *, text: str, model: str, seal: str, content_id: str, created: int) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "version": LABEL_VERSION,
            "aigc": {
                "Label": "1",  # GB 45438-2025: 1 = generated/synthesized by AI
                "ContentProducer": self.provider,
                "ProduceID": content_id,
                "ReservedCode1": self.key_id,
            },
            "provider": self.provider,
            "service": self.service,
            "model": model,
            "seal": seal,
            "content_id": content_id,
            "created": created,
            "content_sha256": content_sha256(text),
            "key_id": self.key_id,
        }
        fields["signature"] = base64.b64encode(self._key.sign(canonical(fields))).decode()
        return fields

    def verify(self, text: str, label: dict[str, Any]) -> VerifyResult:
        fields = dict(label)
        signature = fields.pop("signature", None)
        if not isinstance(signature, str):
            return VerifyResult(False, "label has no signature")
        try:
            self.public_key.verify(base64.b64decode(signature, validate=True), canonical(fields))
        except (InvalidSignature, ValueError):
            return VerifyResult(False, "signature does not match: the label was altered or not issued here")
        if fields.get("content_sha256") != content_sha256(text):
            return VerifyResult(False, "text differs from the labelled content")
        return VerifyResult(True, "text and label were issued by this service unaltered")


def header_value(label: dict[str, Any]) -> str:
    """HTTP headers are latin-1: carry the label as base64 of its canonical JSON."""
    return base64.b64encode(canonical(label)).decode()


def explicit_notice(model: str, provider: str) -> str:
    """The visible label plans may require, appended at the end of the text (the Measures allow start or end)."""
    return f"\n\n[AI-generated content · {provider} · model {model}]"
