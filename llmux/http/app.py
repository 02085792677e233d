"""``create_app(runtime, keys)``: the Falcon ASGI application, no module globals."""

from __future__ import annotations

import time
from importlib.metadata import PackageNotFoundError, version

import falcon.asgi

from llmux.auth import KeyStore
from llmux.http import errors
from llmux.http.admin import AdminModels, AdminState
from llmux.http.apply_template import ApplyTemplate
from llmux.http.auth import Access, AuthMiddleware
from llmux.http.chat import ChatCompletions
from llmux.http.complete_body import CompleteBodies
from llmux.http.completions import Completions
from llmux.http.cors import cors_middleware
from llmux.http.disconnect import ASGIApp, DisconnectWatcher, Watchers
from llmux.http.embeddings import Embeddings
from llmux.http.events import AdminEvents
from llmux.http.forecast import Forecast
from llmux.http.metrics_route import (
    MetricsResource,
    RequestLabels,
    RequestObserver,
    metrics_access,
)
from llmux.http.models import Health, Models
from llmux.http.openapi import OpenAPI, openapi_document
from llmux.http.origin_form import OriginForm
from llmux.http.speech import AudioModels, AudioVoices, Speech
from llmux.http.status_page import StatusPage
from llmux.http.transcribe import Transcribe
from llmux.http.transcriptions import Transcriptions
from llmux.runtime import Runtime

FalconApp = falcon.asgi.App[falcon.asgi.Request, falcon.asgi.Response]


def llmux_version() -> str:
    try:
        return version("llmux")
    except PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "0"


def create_falcon_app(runtime: Runtime, keys: KeyStore) -> FalconApp:
    """Every route. Each GET that ends (all but ``/admin/events``) answers HEAD too: its
    resource's ``on_head`` is its ``on_get``, and Falcon sends the headers alone."""
    cors = cors_middleware(runtime.config.server.cors_origins)
    app = FalconApp(middleware=[AuthMiddleware(keys), RequestLabels(), *cors])
    app.req_options.strip_url_path_trailing_slash = True
    errors.install(app)
    models = Models(runtime, created=int(time.time()))
    admin_models = AdminModels(runtime)
    lists: Access = "open" if runtime.config.server.open_audio_lists else "key"
    status_page = StatusPage()
    app.add_route("/", status_page)
    app.add_route("/status", status_page)
    app.add_route("/health", Health(runtime))
    app.add_route("/openapi.json", OpenAPI(openapi_document(llmux_version())))
    app.add_route("/v1/models", models)
    app.add_route("/v1/models/{model_id:path}", models, suffix="one")  # "org/name" too
    app.add_route("/v1/chat/completions", ChatCompletions(runtime))
    app.add_route("/apply-template", ApplyTemplate(runtime))
    app.add_route("/v1/completions", Completions(runtime))
    app.add_route("/v1/embeddings", Embeddings(runtime))
    app.add_route("/v1/forecast", Forecast(runtime))
    app.add_route("/v1/audio/transcriptions", Transcriptions(runtime, "transcribe"))
    app.add_route("/v1/audio/translations", Transcriptions(runtime, "translate"))
    app.add_route("/v1/audio/speech", Speech(runtime))
    app.add_route("/v1/transcribe", Transcribe(runtime))
    app.add_route("/v1/audio/models", AudioModels(runtime, lists))
    app.add_route("/v1/audio/voices", AudioVoices(runtime, lists))
    app.add_route("/admin/state", AdminState(runtime))
    app.add_route("/admin/events", AdminEvents(runtime))
    app.add_route("/metrics", MetricsResource(
        runtime.metrics, metrics_access(runtime.config.server.metrics_access())))
    app.add_route("/admin/models/{model_id}/load", admin_models, suffix="load")
    app.add_route("/admin/models/{model_id}/unload", admin_models, suffix="unload")
    app.add_route("/admin/models/{model_id}/device", admin_models, suffix="device")
    return app


def create_app(runtime: Runtime, keys: KeyStore, watchers: Watchers) -> ASGIApp:
    """The ASGI app Hypercorn serves: Falcon (behind the check that refuses bodies cut
    short) inside the disconnect watcher, inside the request metrics (which see each
    response end, streams included), inside the rewrite of absolute-form targets.
    ``watchers`` holds the disconnect watchers' tasks."""
    falcon_app = create_falcon_app(runtime, keys)
    watched = DisconnectWatcher(CompleteBodies(falcon_app),  # type: ignore[arg-type]
                                watchers, runtime.config.server.read_timeout_s)
    return OriginForm(RequestObserver(watched, runtime.metrics))
