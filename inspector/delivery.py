"""Delivery of decision events to the line: MQTT, a webhook, OK/NG/REVIEW folders.

Events come from the outbox (``store/outbox.py``), written with each result. A ``Dispatcher`` thread of
`inspector watch` sends the events of its own sources, each sink in order (oldest first): the first event
a sink refuses holds every later one of that sink, retried with backoff up to ``[outputs]
retry_max_seconds``, so a PLC never sees part 12's verdict before part 11's. A row is marked sent only
after the sink accepted it, so delivery is at least once; the event's ``id`` (the result's id) lets the
receiver drop a repeat.

* **mqtt**: one JSON message per event, QoS 1 (the broker acknowledged it), topic from
  ``[outputs] mqtt_topic``; credentials and TLS from settings.
* **webhook**: ``POST`` of the JSON body with ``X-Inspector-Signature: sha256=<HMAC-SHA256 of the body
  with [outputs] webhook_secret>`` and ``X-Inspector-Event-Id``; any 2xx is accepted.
* **folder**: the image is copied (or hard-linked, or moved) to ``<root>/<OK|NG|REVIEW>/<line>/``, written
  under a temporary name and renamed, so a reader never sees half a file. A frame of a multi-frame DICOM
  file is linked (else copied), never moved: the file's other frames may still be waiting to be scored.

A source with ``hide_paths`` (a ``[[sources]]`` key: PACS exports whose folders name the patient) has its
events sent without the path (``path`` is null, ``path_hidden`` true; the content ``sha256`` and, for DICOM,
the UIDs identify the image), and its folder-sink copies named ``<result id><suffix>``. The outbox row keeps
the event as written (the database holds the path anyway).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import shutil
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError

from .backoff import Backoff
from .config import OutputSettings
from .errors import InspectorError, UsageError
from .store.outbox import due, mark_failed, mark_sent

log = logging.getLogger(__name__)
FOLDERS = {"pass": "OK", "fail": "NG", "review": "REVIEW"}


class DeliveryError(InspectorError, RuntimeError):
    """A sink did not accept an event (it stays pending and is retried)."""


def enabled_sinks(outputs: OutputSettings) -> tuple[str, ...]:
    return tuple(name for name, on in (("mqtt", outputs.mqtt_url), ("webhook", outputs.webhook_url),
                                       ("folder", outputs.folder_root)) if on)


def _known_suffix(path: Path) -> str:
    """An image or DICOM suffix of ``path`` ("" for anything else: "DOE.JOHN" has none)."""
    from .dicom import DICOM_SUFFIXES
    from .imaging import IMAGE_SUFFIXES

    suffix = path.suffix.lower()
    return suffix if suffix in IMAGE_SUFFIXES or suffix in DICOM_SUFFIXES else ""


def _slug(value: Any) -> str:
    text = str(value if value not in (None, "") else "none")
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in text)[:100]


class MQTTSink:
    name = "mqtt"

    def __init__(self, outputs: OutputSettings):
        import paho.mqtt.client as mqtt

        url = urlparse(outputs.mqtt_url)
        if url.scheme not in ("mqtt", "mqtts"):
            raise UsageError(f"[outputs] mqtt_url must be mqtt://host:port or mqtts://host:port, not {outputs.mqtt_url}")
        self.topic = outputs.mqtt_topic
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"inspector-{os.getpid()}")
        if outputs.mqtt_username:
            self.client.username_pw_set(outputs.mqtt_username, outputs.mqtt_password or None)
        if url.scheme == "mqtts":
            self.client.tls_set(ca_certs=outputs.mqtt_ca or None)
        self.host, self.port = url.hostname or "localhost", url.port or (8883 if url.scheme == "mqtts" else 1883)
        self.connected = False

    def send(self, event: dict[str, Any]) -> None:
        try:
            if not self.connected:
                self.client.connect(self.host, self.port, keepalive=30)
                self.client.loop_start()
                self.connected = True
            topic = self.topic.format(**{k: _slug(event.get(k)) for k in ("line", "class_name", "decision",
                                                                          "model_version")})
            info = self.client.publish(topic, json.dumps(event, sort_keys=True), qos=1)
            info.wait_for_publish(timeout=10)
            if not info.is_published():
                raise DeliveryError(f"broker did not acknowledge within 10 s (rc {info.rc})")
        except (OSError, ValueError, RuntimeError) as exc:
            self.close()
            raise DeliveryError(f"mqtt {self.host}:{self.port}: {exc}") from None

    def close(self) -> None:
        if self.connected:
            self.client.loop_stop()
            self.client.disconnect()
            self.connected = False


class WebhookSink:
    name = "webhook"

    def __init__(self, outputs: OutputSettings):
        self.url, self.secret, self.timeout = outputs.webhook_url, outputs.webhook_secret, outputs.webhook_timeout

    def send(self, event: dict[str, Any]) -> None:
        body = json.dumps(event, sort_keys=True).encode()
        headers = {"Content-Type": "application/json", "X-Inspector-Event-Id": str(event["id"])}
        if self.secret:
            digest = hmac.new(self.secret.encode(), body, hashlib.sha256).hexdigest()
            headers["X-Inspector-Signature"] = f"sha256={digest}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                if not 200 <= response.status < 300:
                    raise DeliveryError(f"webhook answered {response.status}")
        except urllib.error.HTTPError as exc:
            raise DeliveryError(f"webhook answered {exc.code}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise DeliveryError(f"webhook {self.url}: {exc}") from None

    def close(self) -> None:
        pass


class FolderSink:
    name = "folder"

    def __init__(self, outputs: OutputSettings):
        if outputs.folder_mode not in ("copy", "hardlink", "move"):
            raise UsageError(f"[outputs] folder_mode must be copy, hardlink or move, not {outputs.folder_mode}")
        self.root, self.mode = Path(outputs.folder_root), outputs.folder_mode

    def send(self, event: dict[str, Any], hide_path: bool = False) -> None:
        source = Path(event["path"])
        target_dir = self.root / FOLDERS[event["decision"]] / _slug(event.get("line"))
        target = target_dir / (f"{event['id']}{_known_suffix(source)}" if hide_path else f"{event['id']}_{source.name}")
        if target.exists():
            return  # delivered before a crash: the same event again
        temporary = target_dir / f".{target.name}.partial"
        # a frame of a multi-frame file is never moved: its other frames may not be scored yet, and each
        # frame's event puts the file under its own decision (linked where the file system allows it)
        mode = "link or copy" if self.mode == "move" and int(event.get("frames") or 1) > 1 else self.mode
        try:
            target_dir.mkdir(parents=True, exist_ok=True)
            if temporary.exists() and mode != "move":
                temporary.unlink()
            if mode == "hardlink":
                os.link(source, temporary)
            elif mode == "link or copy":
                try:
                    os.link(source, temporary)
                except OSError as exc:
                    if isinstance(exc, FileNotFoundError):
                        raise
                    shutil.copyfile(source, temporary)  # another file system, or links not allowed
            elif mode == "move":
                shutil.move(str(source), temporary)
            else:
                shutil.copyfile(source, temporary)
            os.replace(temporary, target)
        except FileNotFoundError:
            if self.mode == "move" and target.exists():
                return
            raise DeliveryError(f"folder: {source} is gone") from None
        except OSError as exc:
            raise DeliveryError(f"folder {target_dir}: {exc.strerror or exc}") from None

    def close(self) -> None:
        pass


SINKS = {"mqtt": MQTTSink, "webhook": WebhookSink, "folder": FolderSink}


def without_path(event: dict[str, Any]) -> dict[str, Any]:
    """The event of a ``hide_paths`` source as it is sent: no path (it may name the patient)."""
    return {**event, "path": None, "path_hidden": True}


class Dispatcher:
    """Sends the pending events of ``source_ids`` (None in the list: events without a source, i.e. from
    `inspector score`) to every enabled sink, in order per sink; runs as a thread of the daemon."""

    def __init__(self, engine: Engine, outputs: OutputSettings, source_ids: list[int | None],
                 interval: float = 0.2, hide_paths: set[int] | None = None):
        self.engine = engine
        self.source_ids = source_ids
        self.hide_paths = set(hide_paths or ())
        self.interval = interval
        self.retry_max = outputs.retry_max_seconds
        self.sinks = {name: SINKS[name](outputs) for name in enabled_sinks(outputs)}
        self._backoff = {name: Backoff(0.5, self.retry_max) for name in self.sinks}
        self._not_before = {name: 0.0 for name in self.sinks}
        self.sent = 0

    def drain(self, now: float | None = None) -> int:
        """One pass over every sink; returns how many events were delivered."""
        import time

        now = time.monotonic() if now is None else now
        sent = 0
        for name, sink in self.sinks.items():
            if now < self._not_before[name]:
                continue
            for row in due(self.engine, name, self.source_ids):
                try:
                    event = json.loads(row["payload"])
                    if row["source_id"] is not None and row["source_id"] in self.hide_paths:
                        if name == "folder":
                            sink.send(event, hide_path=True)
                        else:
                            sink.send(without_path(event))
                    else:
                        sink.send(event)
                except DeliveryError as exc:
                    delay = self._backoff[name].next()
                    self._not_before[name] = now + delay
                    mark_failed(self.engine, row["id"], str(exc), delay)
                    log.warning("%s: event %s not delivered (%s); holding this sink's events, retry in %.1fs",
                                name, row["result_id"], exc, delay)
                    break
                mark_sent(self.engine, row["id"])
                self._backoff[name].reset()
                sent += 1
        self.sent += sent
        return sent

    def run(self, stop: threading.Event) -> None:
        try:
            while not stop.is_set():
                try:
                    if not self.drain():
                        stop.wait(self.interval)
                except OperationalError as exc:
                    log.warning("delivery: database unavailable (%s); retrying", str(exc).splitlines()[0])
                    stop.wait(2.0)
                except Exception:  # a sink bug must not end the daemon; its events stay pending
                    log.exception("delivery pass failed; retrying")
                    stop.wait(2.0)
            self.drain()  # a last pass at shutdown
        finally:
            for sink in self.sinks.values():
                sink.close()
