"""Where frames come from: a seeded synthetic scene, a folder of images, or a camera when one is present.

Every source yields uint8 tensors [3, H, W]. A source that cannot work here says so in one line
(`InvalidRequest`), before the agent starts.
"""

from __future__ import annotations

import glob
from collections.abc import Iterator
from pathlib import Path

import torch

from cumulo.edge.scenes import LineScene, ShelfScene
from cumulo.errors import InvalidRequest

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".ppm"}


class FrameSource:
    kind: str  # "shelf" or "line": which edge app reads it
    planogram: list[int] | None = None  # what the shelf should hold, when the source knows it

    def next(self) -> torch.Tensor:
        raise NotImplementedError


class SceneSource(FrameSource):
    def __init__(self, scene: ShelfScene | LineScene) -> None:
        self.scene = scene
        self.kind = "shelf" if isinstance(scene, ShelfScene) else "line"
        self.planogram = list(scene.planogram) if isinstance(scene, ShelfScene) else None

    def next(self) -> torch.Tensor:
        return self.scene.next().image


class FolderSource(FrameSource):
    """The images of a folder in name order, over and over (a recorded shelf, or a test set)."""

    kind = "shelf"

    def __init__(self, folder: Path) -> None:
        try:
            from PIL import Image  # noqa: F401
        except ImportError:
            raise InvalidRequest("reading a folder of images needs Pillow (pip install pillow)") from None
        self.paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.paths:
            raise InvalidRequest(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}")
        self._images: Iterator[Path] = iter(())

    def next(self) -> torch.Tensor:
        from PIL import Image

        path = next(self._images, None)
        if path is None:
            self._images = iter(self.paths)
            path = next(self._images)
        with Image.open(path) as image:
            rgb = image.convert("RGB")
            data = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
            return data.view(rgb.height, rgb.width, 3).permute(2, 0, 1).contiguous()


class CameraSource(FrameSource):
    """The first video device, read through OpenCV when it is installed."""

    kind = "shelf"

    def __init__(self) -> None:
        devices = sorted(glob.glob("/dev/video*"))
        if not devices:
            raise InvalidRequest(
                "no camera on this machine (no /dev/video*); use --source synthetic:shelf or DIR"
            )
        try:
            import cv2  # type: ignore[import-not-found]
        except ImportError:
            raise InvalidRequest(f"camera {devices[0]} found, but reading it needs opencv-python") from None
        self._capture = cv2.VideoCapture(devices[0])
        if not self._capture.isOpened():
            raise InvalidRequest(f"camera {devices[0]} could not be opened")
        self._cv2 = cv2

    def next(self) -> torch.Tensor:
        ok, frame = self._capture.read()
        if not ok:
            raise InvalidRequest("the camera stopped delivering frames")
        rgb = self._cv2.cvtColor(frame, self._cv2.COLOR_BGR2RGB)
        return torch.from_numpy(rgb).permute(2, 0, 1).contiguous()


def open_source(spec: str, seed: int = 0, change_every: float = 20.0) -> FrameSource:
    """`synthetic:shelf`, `synthetic:line`, a folder path, or `camera`."""
    if spec == "synthetic:shelf":
        return SceneSource(ShelfScene(seed=seed, change_every=change_every))
    if spec == "synthetic:line":
        return SceneSource(LineScene(seed=seed, toggle_every=change_every))
    if spec == "camera":
        return CameraSource()
    if spec.startswith("synthetic:"):
        raise InvalidRequest(f"unknown synthetic scene {spec!r}; known: synthetic:shelf, synthetic:line")
    folder = Path(spec).expanduser()
    if not folder.is_dir():
        raise InvalidRequest(f"--source {spec!r} is not synthetic:shelf, synthetic:line, camera or a folder")
    return FolderSource(folder)
