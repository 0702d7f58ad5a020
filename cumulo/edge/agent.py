"""The edge agent: enrol once, then read frames, run the model, store results in the outbox and send them.

Its data directory holds everything that must survive a restart: `device.json` (the device id and credential,
mode 0600), `outbox.db` (results not yet acknowledged, and the seq counter), `state.json` (the desired revision
and model it last applied) and `models/` (packages by sha256). Desired state arrives retained on MQTT, or by
polling `GET /v1/edge/desired` while the broker is out of reach; a model that fails its sha256 or does not load
is reported as an error status (a result, so it is delivered even after an outage) and the old model keeps
running, so the fleet can roll back.

A device that knows its class (`device_class`, a chip id of the catalog such as imx500 or rpi5) names it in each
heartbeat and reported state, which sets the class the service checks rollouts against, and refuses a model
that does not fit it (`check_package_fits`, the service's check) the way it refuses a broken one.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import torch

from cumulo.chips.catalog import get_chip
from cumulo.contracts.edge import (
    KIND_HEARTBEAT,
    KIND_IMAGE,
    KIND_REPORTED,
    KIND_STATUS,
    MAX_ENVELOPE_BYTES,
    TOPIC_ROOT,
    UP_HEARTBEAT,
    UP_REPORTED,
    DesiredState,
    DeviceRequest,
    Envelope,
    now,
)
from cumulo.edge.app import LineApp, Result, ShelfApp
from cumulo.edge.footprint import check_package_fits
from cumulo.edge.model import ShelfModel, load_package, save_package, train_shelf_net
from cumulo.edge.outbox import Outbox
from cumulo.edge.scenes import shelf_crops
from cumulo.edge.sources import FrameSource
from cumulo.edge.transport import HttpLink, Sender
from cumulo.errors import CumuloError, DownloadError, InvalidRequest

MAX_MODEL_BYTES = 256 * 1024 * 1024


@dataclass
class Identity:
    device_id: str
    credential: str
    mqtt_url: str | None = None

    def save(self, data_dir: Path) -> None:
        path = data_dir / "device.json"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # the credential: owner only
        with os.fdopen(fd, "w") as handle:
            json.dump(self.__dict__, handle)
        os.chmod(path, 0o600)

    @classmethod
    def load(cls, data_dir: Path) -> Identity | None:
        path = data_dir / "device.json"
        return cls(**json.loads(path.read_text())) if path.exists() else None


def enroll(data_dir: Path, server: str | None, token: str | None) -> Identity:
    """The stored identity, or a new one from trading the one-time token (which cannot be used twice)."""
    identity = Identity.load(data_dir)
    if identity is not None:
        return identity
    if not server or not token:
        raise InvalidRequest(f"this device is not enrolled yet ({data_dir}): give --server and --token")
    answer = HttpLink(server).enroll(token)
    identity = Identity(answer.device_id, answer.credential, answer.mqtt_url)
    identity.save(data_dir)
    return identity


@dataclass
class AgentSettings:
    server: str | None = None
    mqtt_url: str | None = None
    topic_root: str = TOPIC_ROOT
    fps: float = 5.0
    heartbeat_s: float = 10.0
    desired_poll_s: float = 30.0
    fallback_after: float = 10.0
    format: str = "mxint8"
    max_outbox: int = 100_000
    summary_every: int = 100
    device_class: str | None = None  # a chip id of the catalog: what this device is, said to the service


@dataclass
class Agent:
    data_dir: Path
    identity: Identity
    source: FrameSource
    settings: AgentSettings = field(default_factory=AgentSettings)
    model_path: Path | None = None  # a package to start with, until a rollout installs another; else built-in

    def __post_init__(self) -> None:
        if self.settings.device_class is not None:
            # An unknown class is a one-line error before anything starts; a known one is named by its chip id.
            self.settings.device_class = get_chip(self.settings.device_class).id
        self.state = self._read_state()
        start = None
        if self.source.kind == "shelf":
            start = Path(self.state.get("model_path") or self.model_path or self._builtin_model())
            self._check_fits(start)  # a device never starts a model its class cannot run
        self.outbox = Outbox(self.data_dir / "outbox.db", self.settings.max_outbox)
        self.sender = Sender(
            self.outbox,
            self.identity.device_id,
            self.identity.credential,
            self.settings.server,
            self.settings.mqtt_url or self.identity.mqtt_url,
            self._on_message,
            self.settings.topic_root,
            self.settings.fallback_after,
        )
        self.model: ShelfModel | None = None
        self.model_ref: dict[str, Any] | None = None
        if start is not None:
            self._load_model(start)
        self.app = self._make_app()
        self.started = time.monotonic()
        self.frames = 0
        self._last_frame: torch.Tensor | None = None
        self._reported_drops = self.outbox.stats().dropped
        self._next_heartbeat = self._next_poll = 0.0
        self._class_reported = self.settings.device_class is None

    # -- state that survives restarts ---------------------------------------------------------------------
    def _read_state(self) -> dict[str, Any]:
        path = self.data_dir / "state.json"
        return json.loads(path.read_text()) if path.exists() else {"revision": -1}

    def _write_state(self) -> None:
        tmp = self.data_dir / "state.json.tmp"
        tmp.write_text(json.dumps(self.state))
        tmp.replace(self.data_dir / "state.json")

    def _check_fits(self, path: Path) -> None:
        """A package this device's class cannot hold or run, in the format it names (the service's check) or
        in the one the agent runs it in: a one-line DoesNotFit. Nothing to check without a class."""
        if self.settings.device_class is not None:
            check_package_fits(path, self.settings.device_class, None, self.settings.format)

    def _builtin_model(self) -> Path:
        """The shelf model trained on the generator (seeded), made once and kept in the data directory."""
        path = self.data_dir / "models" / "builtin-shelf.safetensors"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            save_package(train_shelf_net(seed=0), path.with_suffix(".tmp"), self.settings.format)
            path.with_suffix(".tmp").replace(path)
        return path

    def _load_model(self, path: Path, ref: dict[str, Any] | None = None) -> None:
        self.model = load_package(path, self.settings.format)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if ref is None and str(path) == self.state.get("model_path"):
            ref = self.state.get("model")  # the model a rollout installed, after a restart
        self.model_ref = ref or {"name": path.stem, "version": "local", "sha256": digest}

    def _make_app(self) -> ShelfApp | LineApp:
        if self.source.kind == "line":
            return LineApp(summary_every=self.settings.summary_every)
        planogram = self.state.get("config", {}).get("planogram") or self.source.planogram
        if planogram is None:  # a folder or a camera with no planogram given: the first frame sets it
            planogram = [int(c) for c in self._classify(self.source.next())]
        return ShelfApp(list(planogram), self.model.labels, summary_every=self.settings.summary_every)

    # -- the loop -----------------------------------------------------------------------------------------
    def _classify(self, image: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[1:]
        rows, cols = (height - 4) // 28, (width - 4) // 28
        classes, _ = self.model.classify(shelf_crops(image, rows, cols))
        return classes

    def _store(self, results: list[Result]) -> None:
        for result in results:
            self.outbox.add(result.kind, result.body, self.model_ref, result.summary)
        drops = self.outbox.stats().dropped
        if drops != self._reported_drops:  # a full outbox never loses results silently
            stats = self.outbox.stats()
            body = {"type": "outbox_full", "dropped_summaries": stats.dropped_summaries}
            self.outbox.add(KIND_STATUS, body | {"ok": True, "dropped_events": stats.dropped_events})
            self._reported_drops = drops

    def step(self) -> None:
        """One frame: read, infer, store the results; then send, heartbeat and follow desired state."""
        image = self.source.next()
        self._last_frame = image
        if isinstance(self.app, ShelfApp):
            self._store(self.app.update(self._classify(image)))
        else:
            self._store(self.app.update(image))
        self.frames += 1
        self.pump()

    def pump(self) -> None:
        self.sender.pump()
        clock = time.monotonic()
        if clock >= self._next_heartbeat:
            self._next_heartbeat = clock + self.settings.heartbeat_s
            stats = self.outbox.stats()
            body = {
                "uptime_s": round(clock - self.started, 3),
                "frames": self.frames,
                "outbox_pending": stats.pending,
                "dropped_summaries": stats.dropped_summaries,
                "dropped_events": stats.dropped_events,
                "error": self.sender.error,
            }
            self._publish(UP_HEARTBEAT, KIND_HEARTBEAT, body)
        if not self._class_reported:  # a reported state (QoS 1) once per start, tried until it goes out
            body = {"state": "running", "revision": self.state.get("revision", -1)}
            self._class_reported = self._publish(UP_REPORTED, KIND_REPORTED, body)
        mqtt_up = self.sender.mqtt is not None and self.sender.mqtt.connected
        if self.sender.http is not None and not mqtt_up and clock >= self._next_poll:
            self._next_poll = clock + self.settings.desired_poll_s
            try:
                desired = self.sender.http.desired(self.identity.credential)
            except CumuloError:
                desired = None  # out of reach: the heartbeat says so; try again at the next poll
            if desired is not None:
                self.apply_desired(desired)

    def _publish(self, leaf: str, kind: str, body: dict[str, Any]) -> bool:
        """Heartbeats and reported state: latest wins, so they skip the outbox. Their seq is the last one taken.
        Each names the device's class when it knows it. True when it went out."""
        if self.settings.device_class is not None:
            body = {**body, "device_class": self.settings.device_class}
        seq = self.outbox.stats().next_seq - 1
        message = Envelope(
            device_id=self.identity.device_id,
            seq=seq,
            time=now(),
            kind=kind,
            model=self.model_ref,
            body=body,
            auth=self.identity.credential,
        )
        return self.sender.publish(leaf, message, qos=1 if leaf == UP_REPORTED else 0)

    def run(self, max_frames: int | None = None, should_stop: Any = None) -> None:
        period = 1.0 / self.settings.fps if self.settings.fps > 0 else 0.0
        while max_frames is None or self.frames < max_frames:
            if should_stop is not None and should_stop():
                break
            started = time.monotonic()
            self.step()
            time.sleep(max(0.0, period - (time.monotonic() - started)))

    def drain(self, timeout: float) -> bool:
        """Keep sending until the outbox is empty or `timeout` passes; True when it emptied."""
        deadline = time.monotonic() + timeout
        while self.outbox.stats().pending and time.monotonic() < deadline:
            self.pump()
            time.sleep(0.05)
        return not self.outbox.stats().pending

    def close(self) -> None:
        self.sender.close()
        self.outbox.close()

    # -- messages from the fleet --------------------------------------------------------------------------
    def _on_message(self, leaf: str, payload: bytes) -> None:
        try:
            if leaf == "down/desired":
                if payload:  # an empty retained message clears the desired state: nothing to do
                    self.apply_desired(DesiredState.model_validate_json(payload))
            else:
                self.answer(DeviceRequest.model_validate_json(payload))
        except ValueError as error:  # a malformed message from the fleet: report it, never crash
            self.outbox.add(
                KIND_STATUS, {"ok": True, "type": "bad_message", "detail": str(error).splitlines()[0]}
            )

    def apply_desired(self, desired: DesiredState) -> None:
        if desired.device_id != self.identity.device_id or desired.revision <= self.state.get("revision", -1):
            return  # another device's, or a stale retained copy
        self.state["revision"] = desired.revision
        if desired.config != self.state.get("config"):
            self.state["config"] = desired.config
            if self.model is not None and desired.config.get("planogram"):
                self.app = self._make_app()  # a new planogram: judge the shelf against it from now on
        if desired.model is None and self.state.get("model") is not None:
            self._back_to_factory(desired)
        elif desired.model is not None and (self.model_ref or {}).get("sha256") != desired.model.sha256:
            ref = desired.model.model_dump(exclude={"url"})
            self._publish(UP_REPORTED, KIND_REPORTED, {"state": "downloading", "revision": desired.revision})
            try:
                path = self._download(desired.model.url, desired.model.sha256)
                if self.source.kind == "shelf":
                    self._check_fits(path)
                    self._load_model(path, ref)
                else:
                    self.model_ref = ref
            except CumuloError as error:
                self.outbox.add(
                    KIND_STATUS, {"ok": False, "error": str(error), "rollout_id": desired.rollout_id}, ref
                )
                self._publish(UP_REPORTED, KIND_REPORTED, {"state": "failed", "error": str(error)})
                self._write_state()
                return
            self.state["model"], self.state["model_path"] = ref, str(path)
            self.outbox.add(KIND_STATUS, {"ok": True, "rollout_id": desired.rollout_id}, ref)
        self._write_state()
        self._publish(UP_REPORTED, KIND_REPORTED, {"state": "running", "revision": desired.revision})

    def _back_to_factory(self, desired: DesiredState) -> None:
        """No model desired after a rollout installed one (a rollback with no earlier good model): stop the
        rollout's model and run the one the device was made with (`--model`, else the built-in model)."""
        failed = self.state.pop("model")
        self.state.pop("model_path", None)
        if self.source.kind == "shelf":
            self._load_model(Path(self.model_path or self._builtin_model()))
        else:
            self.model_ref = None
        body = {"ok": True, "type": "factory_model", "stopped": failed, "revision": desired.revision}
        self.outbox.add(KIND_STATUS, body, self.model_ref)

    def _download(self, url: str, sha256: str) -> Path:
        path = self.data_dir / "models" / f"{sha256}.safetensors"
        if path.exists() and hashlib.sha256(path.read_bytes()).hexdigest() == sha256:
            return path
        full = urljoin((self.settings.server or "").rstrip("/") + "/", url)
        request = urllib.request.Request(full)
        if self.settings.server and full.startswith(self.settings.server):
            request.add_header("Authorization", f"Bearer {self.identity.credential}")
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                data = response.read(MAX_MODEL_BYTES + 1)
        except (OSError, ValueError) as error:
            raise DownloadError(f"model download from {full} failed: {error}") from None
        if len(data) > MAX_MODEL_BYTES:
            raise DownloadError(f"model at {full} is over {MAX_MODEL_BYTES} bytes")
        digest = hashlib.sha256(data).hexdigest()
        if digest != sha256:
            raise DownloadError(f"model at {full} has sha256 {digest[:12]}..., expected {sha256[:12]}...")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.with_suffix(".tmp").write_bytes(data)
        path.with_suffix(".tmp").replace(path)
        return path

    def answer(self, request: DeviceRequest) -> None:
        """Send the latest frame as JPEG parts: the only way an image leaves the device. Each request id is
        answered once, across restarts too (the outbox keeps the ids): QoS 1, or the service sending a missed
        request again, may deliver it twice. A request that comes before the first frame (just after a restart)
        takes a frame of its own."""
        if self._last_frame is None:
            try:
                self._last_frame = self.source.next()
            except CumuloError:
                body = {"ok": True, "type": "no_frame", "request_id": request.id}
                self.outbox.answer(request.id, [(KIND_STATUS, body)])
                return
        try:
            from PIL import Image
        except ImportError:
            self.outbox.answer(
                request.id, [(KIND_STATUS, {"ok": True, "type": "no_jpeg", "request_id": request.id})]
            )
            return
        buffer = io.BytesIO()
        Image.fromarray(self._last_frame.permute(1, 2, 0).numpy()).save(buffer, format="JPEG", quality=85)
        data = base64.b64encode(buffer.getvalue()).decode()
        step = MAX_ENVELOPE_BYTES // 2  # room for the envelope around each part
        parts = [data[i : i + step] for i in range(0, len(data), step)]
        bodies = [
            {"request_id": request.id, "part": index, "parts": len(parts), "jpeg_b64": part}
            for index, part in enumerate(parts)
        ]
        self.outbox.answer(request.id, [(KIND_IMAGE, body) for body in bodies], self.model_ref)
