"""`cumulo edge agent`: what a user gets wrong is one line and exit status 1, never a traceback; a folder of
images and an image request work as the brief says."""

from __future__ import annotations

import base64
import io
import os
from pathlib import Path

import pytest
from PIL import Image

from cumulo.cli.edge_agent import main
from cumulo.contracts.edge import DeviceRequest
from cumulo.edge.agent import Agent, AgentSettings, Identity
from cumulo.edge.scenes import EMPTY, ShelfScene
from cumulo.edge.sources import FolderSource, SceneSource, open_source


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--source", "synthetic:forest"], "unknown synthetic scene"),
        (["--source", "/no/such/folder"], "is not synthetic:shelf"),
        (["--mqtt", "http://broker:1883"], "not an MQTT broker URL"),
        ([], "not enrolled yet"),
    ],
)
def test_mistakes_are_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert main([*argv, "--data-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_camera_without_one_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if any(name.startswith("video") for name in os.listdir("/dev")):
        pytest.fail("this test expects a machine without a camera")
    assert main(["--source", "camera", "--data-dir", str(tmp_path)]) == 1
    assert "no camera on this machine" in capsys.readouterr().err


def test_a_folder_of_shelf_photos_gives_the_same_events_as_the_scene(
    tmp_path: Path, shelf_package: Path
) -> None:
    scene = ShelfScene(seed=4, change_every=0)
    photos = tmp_path / "photos"
    photos.mkdir()
    for index in range(6):
        if index == 2:
            scene.set_slot(3, EMPTY)
        image = scene.next().image.permute(1, 2, 0).numpy()
        Image.fromarray(image).save(photos / f"{index:03d}.png")
    source = open_source(str(photos))
    assert isinstance(source, FolderSource)
    data = tmp_path / "agent"
    data.mkdir()
    agent = Agent(
        data, Identity("dev-f", "cred-f"), source, AgentSettings(fps=0, summary_every=0), shelf_package
    )
    agent.run(max_frames=6)  # the first photo sets the planogram: no planogram came with the folder
    texts = [p.body.get("text") for p in agent.outbox.pending()]
    assert texts == ["slot 3 empty"]
    agent.close()


def test_an_image_leaves_the_device_only_when_asked_and_in_parts_under_the_limit(
    tmp_path: Path, shelf_package: Path
) -> None:
    source = SceneSource(ShelfScene(seed=4, change_every=0))
    agent = Agent(
        tmp_path, Identity("dev-i", "cred-i"), source, AgentSettings(fps=0, summary_every=0), shelf_package
    )
    agent.run(max_frames=20)
    assert agent.outbox.pending() == []  # a still shelf: nothing at all is sent, no image either
    agent._on_message("down/requests", DeviceRequest(id="r1", kind="image").model_dump_json().encode())
    parts = agent.outbox.pending()
    assert parts and all(p.kind == "image" and p.body["request_id"] == "r1" for p in parts)
    jpeg = base64.b64decode("".join(p.body["jpeg_b64"] for p in parts))
    with Image.open(io.BytesIO(jpeg)) as image:
        assert image.format == "JPEG" and image.size == (source.scene.size[1], source.scene.size[0])
    agent._on_message("down/requests", b"{not json")  # a malformed request is reported, not fatal
    assert agent.outbox.pending()[-1].body["type"] == "bad_message"
    agent.close()
