"""``create_app(runtime)``: the Falcon ASGI application, no module globals."""

from __future__ import annotations

import time

import falcon.asgi

from llmux.http import errors
from llmux.http.admin import AdminModels, AdminState
from llmux.http.chat import ChatCompletions
from llmux.http.disconnect import ASGIApp, DisconnectWatcher
from llmux.http.models import Health, Models
from llmux.runtime import Runtime

FalconApp = falcon.asgi.App[falcon.asgi.Request, falcon.asgi.Response]


def create_falcon_app(runtime: Runtime) -> FalconApp:
    app = falcon.asgi.App(cors_enable=False)
    app.req_options.strip_url_path_trailing_slash = True
    errors.install(app)
    models = Models(runtime, created=int(time.time()))
    admin_models = AdminModels(runtime)
    app.add_route("/health", Health(runtime))
    app.add_route("/v1/models", models)
    app.add_route("/v1/models/{model_id}", models, suffix="one")
    app.add_route("/v1/chat/completions", ChatCompletions(runtime))
    app.add_route("/admin/state", AdminState(runtime))
    app.add_route("/admin/models/{model_id}/load", admin_models, suffix="load")
    app.add_route("/admin/models/{model_id}/unload", admin_models, suffix="unload")
    return app


def create_app(runtime: Runtime) -> ASGIApp:
    """The ASGI app Hypercorn serves: Falcon inside the disconnect watcher."""
    return DisconnectWatcher(create_falcon_app(runtime))  # type: ignore[arg-type]
