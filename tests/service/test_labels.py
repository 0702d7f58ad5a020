"""Implicit labels: any change to the text or to a label field, or a label signed elsewhere, fails verification."""

from __future__ import annotations

import base64
import json
import os
import stat

from cumulo.service.labels import Labeler, header_value, load_or_create_signing_key


def _labeler(tmp_path) -> Labeler:  # noqa: ANN001
    return Labeler(load_or_create_signing_key(tmp_path), "Cumulo", "cumulo-test")


def test_label_names_producer_model_seal_and_content(tmp_path):
    label = _labeler(tmp_path).label(text="hello", model="m", seal="sha256:1", content_id="c-1", created=5)
    assert label["aigc"]["Label"] == "1" and label["aigc"]["ProduceID"] == "c-1"
    assert (label["provider"], label["model"], label["seal"], label["created"]) == (
        "Cumulo",
        "m",
        "sha256:1",
        5,
    )
    assert json.loads(base64.b64decode(header_value(label))) == label


def test_altered_text_or_label_fields_fail_verification(tmp_path):
    labeler = _labeler(tmp_path)
    label = labeler.label(text="hello", model="m", seal="sha256:1", content_id="c-1", created=5)
    assert labeler.verify("hello", label).valid
    assert not labeler.verify("hello!", label).valid
    for field, value in (("model", "other"), ("seal", "sha256:2"), ("created", 6), ("provider", "Me")):
        assert not labeler.verify("hello", {**label, field: value}).valid, field
    assert not labeler.verify("hello", {k: v for k, v in label.items() if k != "signature"}).valid
    assert not labeler.verify("hello", {**label, "signature": "%%%"}).valid


def test_a_label_signed_by_another_service_is_rejected(tmp_path):
    mine = _labeler(tmp_path / "a")
    theirs = _labeler(tmp_path / "b")
    label = theirs.label(text="hi", model="m", seal="s", content_id="c", created=1)
    assert not mine.verify("hi", label).valid


def test_signing_key_is_private_and_reused(tmp_path):
    first = _labeler(tmp_path)
    second = _labeler(tmp_path)
    assert first.key_id == second.key_id
    mode = stat.S_IMODE(os.stat(tmp_path / "label_ed25519.pem").st_mode)
    assert mode == 0o600
