"""``GET /metrics`` and the HTTP side of the metrics: what each request and job reports.

A request's labels are gathered as it runs, in a :class:`RequestRecord` kept in the ASGI
scope: the route template and key name by :class:`RequestLabels` (Falcon middleware,
after routing and auth), the virtual model by :func:`note_model` once it resolved. The
outer ASGI wrapper :class:`RequestObserver` reports the request when its response has
really ended, streams included (Falcon runs ``process_response`` before an SSE body).
"""

from __future__ import annotations

import time
from typing import Final

import attrs
import falcon.asgi
from prometheus_client import CONTENT_TYPE_LATEST

from llmux.http.auth import Access
from llmux.http.disconnect import ASGIApp, Message, Receive, Scope, Send
from llmux.metrics import NO_KEY, Metrics
from llmux.runtime import Ticket

RECORD_KEY: Final = "llmux.request"
UNMATCHED: Final = "unmatched"  # the route label of a path no route matched


@attrs.define(kw_only=True)
class RequestRecord:
    """The labels of one request, filled in as it is handled."""

    metrics: Metrics
    started: float
    route: str = UNMATCHED
    model: str | None = None
    key: str = NO_KEY
    status: int | None = None


def record_of(req: falcon.asgi.Request) -> RequestRecord | None:
    record = req.scope.get(RECORD_KEY)
    return record if isinstance(record, RequestRecord) else None


def note_model(req: falcon.asgi.Request, name: str) -> None:
    """The request named this configured virtual model (call once it resolved)."""
    if (record := record_of(req)) is not None:
        record.model = name


def watch_job(req: falcon.asgi.Request, ticket: Ticket) -> None:
    """Time this request's job (queue wait, first token) and count its tokens."""
    if (record := record_of(req)) is not None:
        ticket.watch = record.metrics.job_watch(req.uri_template or UNMATCHED, record.model)


class RequestLabels:
    """Falcon middleware: copies the route template and the key's name to the record."""

    async def process_response(self, req: falcon.asgi.Request, resp: falcon.asgi.Response,
                               resource: object, req_succeeded: bool) -> None:
        if (record := record_of(req)) is None:
            return
        record.route = req.uri_template or UNMATCHED
        name = req.context.get("key_name")
        record.key = name if isinstance(name, str) and name != "-" else NO_KEY


class RequestObserver:
    """ASGI wrapper: one count and one duration per HTTP request, when it has ended."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        record = RequestRecord(metrics=self.metrics, started=time.monotonic())
        scope[RECORD_KEY] = record

        async def watched_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                record.status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, watched_send)
        finally:
            # NOTE: no response started means the app failed (the server answers 500)
            # or the request was cancelled before it could answer.
            self.metrics.observe_request(
                route=record.route, model=record.model, status=record.status or 500,
                key=record.key, seconds=time.monotonic() - record.started)


class MetricsResource:
    """``GET /metrics``: the Prometheus text format, open or admin-only per the config."""

    def __init__(self, metrics: Metrics, access: Access) -> None:
        self.metrics = metrics
        self.access = access  # read by the auth middleware, per instance

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        resp.data = self.metrics.exposition()
        resp.content_type = CONTENT_TYPE_LATEST


def metrics_access(value: str) -> Access:
    """The config's "open" | "admin" as the auth middleware's access level."""
    return "open" if value == "open" else "admin"
