"""The shelf model, trained on the generator, agrees in MXINT8 with fp32 on held-out frames; bad packages are
one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cumulo.edge import model as shelf_model
from cumulo.edge.model import PackedConv2d, load_package, save_package, train_shelf_net
from cumulo.edge.scenes import ShelfScene, shelf_crops
from cumulo.errors import FormatError, InvalidModel
from cumulo.formats.linear import PackedLinear


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_package(train_shelf_net(seed=0), tmp_path_factory.mktemp("model") / "shelf.safetensors")


@pytest.mark.parametrize("format", ["mxint8", "fp8"])
def test_quantized_model_agrees_with_fp32_on_held_out_frames(package: Path, format: str) -> None:
    fp32, packed = load_package(package, "fp32"), load_package(package, format)
    assert all(isinstance(m, PackedConv2d | PackedLinear) for m in packed.net.children())
    scene = ShelfScene(seed=1234, change_every=3)  # a seed the training never saw
    frames = [scene.next() for _ in range(40)]
    crops = torch.cat([shelf_crops(f.image, scene.rows, scene.cols) for f in frames])
    truth = torch.tensor([s for f in frames for s in f.slots])
    reference, _ = fp32.classify(crops)
    quantized, _ = packed.classify(crops)
    assert (quantized == reference).float().mean() >= 0.99
    assert (reference == truth).float().mean() >= 0.98  # the model has learned the scene, too


def test_training_is_seeded() -> None:
    a, b = train_shelf_net(seed=7, per_class=30, epochs=1), train_shelf_net(seed=7, per_class=30, epochs=1)
    assert all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


def test_bad_packages_are_one_line_errors(tmp_path: Path, package: Path) -> None:
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a model at all")
    with pytest.raises(InvalidModel, match="not a model package"):
        load_package(junk)
    other = tmp_path / "other.safetensors"
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(other), metadata={"arch": "something-else"})
    with pytest.raises(InvalidModel, match="unknown architecture"):
        load_package(other)
    with pytest.raises(FormatError, match="unknown weight format"):
        load_package(package, "int3")
    assert shelf_model.ARCH in package.read_bytes()[:400].decode(errors="replace")
