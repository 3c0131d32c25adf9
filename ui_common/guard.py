"""Server-side checks every event goes through (the rules are in hypersd_core/app/access.py):

- :func:`guard` wraps an event function with its role: the caller is checked when the
  call arrives, whatever the page shows or hides; errors reach the client as one line
  without server paths.
- :func:`limit_queue_per_client` caps the calls one client may have waiting in the queue.
- :class:`BoundedSketchpad` is ``gr.Sketchpad`` with its blob upload route bounded.

Every event of the app is registered with an explicit ``api_name`` and a role; the
probe in tests/app/test_access.py calls each one over HTTP by ``fn_index``.
"""

from __future__ import annotations

import functools
import logging

import gradio as gr
from gradio.components.base import server
from gradio.context import LocalContext
from PIL import Image

from hypersd_core.app import access
from hypersd_core.app.service import AppSettings

log = logging.getLogger("hypersd.app")


def _request():
    """The gr.Request of the event being processed, or None for an in-process call."""
    return LocalContext.request.get(None)


def peer_of(request) -> str | None:
    """The socket peer of a gr.Request (never a forwarded header)."""
    client = getattr(request, "client", None)
    return getattr(client, "host", None) or None


def address_of(request, settings: AppSettings) -> str | None:
    """The client's address (X-Forwarded-For only behind settings.trusted_proxies)."""
    if request is None:
        return None
    headers = getattr(request, "headers", None)
    return access.client_address(headers, peer_of(request), settings.trusted_proxies)


def guard(fn, role: str, settings: AppSettings, token_arg: int | None = None):
    """``fn`` checked for ``role`` on every call that comes through the server; an
    in-process call (tests, scripts: no request) is trusted. ``token_arg``: index of the
    argument holding the owner token (role "owner")."""
    if role not in access.ROLES:
        raise ValueError(f"unknown access role {role!r}")

    @functools.wraps(fn)
    def guarded(*args, **kwargs):
        request = _request()
        if request is not None or LocalContext.in_event_listener.get(False):
            token = args[token_arg] if token_arg is not None and len(args) > token_arg else None
            why = access.refusal(role, settings, peer_of(request), token)
            if why:
                raise gr.Error(why, print_exception=False)
        try:
            return fn(*args, **kwargs)
        except gr.Error as err:
            err.message = access.scrub_paths(str(err.message))
            raise
        except Exception as err:  # noqa: BLE001 - one line to the client, details in the log
            log.warning("%s failed: %s: %s", getattr(fn, "__name__", "event"),
                        type(err).__name__, err)
            first = (str(err).splitlines() or [type(err).__name__])[0][:300]
            raise gr.Error(access.scrub_paths(first), print_exception=False) from None

    guarded.access_role = role
    return guarded


def limit_queue_per_client(demo: gr.Blocks, settings: AppSettings) -> None:
    """Refuse a call when its client already has ``settings.queue_per_client`` calls
    waiting, so that no client can fill the shared queue (everyone else would get "Queue
    is full"). Clients are told apart by address (access.client_address)."""
    queue = demo._queue
    push = queue.push

    async def push_limited(body, request, username):
        key = address_of(request, settings)
        waiting = sum(1 for q in queue.event_queue_per_concurrency_id.values()
                      for e in q.queue if address_of(e.request, settings) == key)
        if waiting >= settings.queue_per_client:
            return (False, f"This client already has {waiting} calls waiting; wait for them "
                    "to finish.", "queue_full")
        return await push(body, request, username)

    queue.push = push_limited


# ------------------------------------------------------------------- sketchpad
MAX_LAYERS = 3  # the drawing's layers; the editor's index is checked against it
MAX_BLOB_BYTES = 512 * 1024  # a 256 x 256 RGBA PNG is at most ~263 KB
MAX_PENDING_DRAWINGS = 16  # uploaded drawings not yet used by a call


class BoundedSketchpad(gr.Sketchpad):
    """``gr.Sketchpad`` whose blob route takes a layer index below MAX_LAYERS, blobs of at
    most MAX_BLOB_BYTES, and keeps at most MAX_PENDING_DRAWINGS drawings (oldest dropped);
    a drawing that cannot be read is one short error line, not a traceback."""

    @server
    def accept_blobs(self, data):
        kind = data.data.get("type")
        raw = data.data.get("index")
        if kind not in ("layer", "background", "composite"):
            raise ValueError(f"unknown blob type {str(kind)[:20]!r}")
        if kind == "layer":
            try:
                index = int(raw)
            except (TypeError, ValueError):
                raise ValueError("a layer blob needs an integer index") from None
            if not 0 <= index < MAX_LAYERS:
                raise ValueError(f"layer index must be in [0, {MAX_LAYERS}), got {index}")
        if len(data.files) != 1 or len(data.files[0][1]) > MAX_BLOB_BYTES:
            raise ValueError(f"one blob of at most {MAX_BLOB_BYTES:,} bytes per call")
        blob_id = data.data.get("id")
        while blob_id not in self.blob_storage and len(self.blob_storage) >= MAX_PENDING_DRAWINGS:
            self.blob_storage.pop(next(iter(self.blob_storage)))  # the oldest drawing
        return super().accept_blobs(data)

    def preprocess(self, payload):
        try:
            return super().preprocess(payload)
        except gr.Error:
            raise
        except (Image.DecompressionBombError, OSError, ValueError, SyntaxError) as err:
            reason = "too large" if isinstance(err, Image.DecompressionBombError) else "unreadable"
            raise gr.Error(f"the drawing is {reason}: draw on the {self.canvas_size[0]} x "
                           f"{self.canvas_size[1]} canvas", print_exception=False) from None
