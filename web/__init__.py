"""modelbay's HTTP API: ``create_app(test_config)`` builds it; gunicorn serves ``web.wsgi:app``."""
from __future__ import annotations

import logging
import os
from typing import Any
from collections.abc import Mapping

from flask import Flask

from tasks.settings import load_settings
from web.jsonprovider import OrjsonProvider


class ModelbayFlask(Flask):
    json_provider_class = OrjsonProvider


def create_app(test_config: Mapping[str, Any] | None = None) -> Flask:
    """Build the app. ``test_config`` may hold ``MODELBAY_ENV`` (``MODELBAY_*`` variables laid
    over the environment), ``MODELBAY`` (typed settings overrides) and any Flask config key."""
    from web import auth, errors, jobs, metrics, models, nodes, openapi, operations, queues, ui
    from web.extensions import Modelbay
    from web.openai import batches as openai_batches
    from web.openai import files as openai_files
    from web.openai import routes as openai_routes

    app = ModelbayFlask(__name__, static_folder=None)
    config = dict(test_config or {})
    environ = {**os.environ, **config.pop("MODELBAY_ENV", {})}
    settings = load_settings(environ, **config.pop("MODELBAY", {}))
    app.config.update(MAX_CONTENT_LENGTH=settings.max_body_bytes, JSON_SORT_KEYS=False)
    app.config.update(config)
    app.json.sort_keys = False
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    Modelbay(app, settings)
    errors.init_app(app)
    auth.init_app(app, settings.api_key_list, open_metrics=settings.metrics_open)
    for blueprint in (models.bp, jobs.bp, nodes.bp, operations.bp, openai_routes.bp, openapi.bp, metrics.bp, ui.bp):
        app.register_blueprint(blueprint)
    app.register_blueprint(openai_files.bp)  # /v1/files
    app.register_blueprint(openai_batches.bp)  # /v1/batches
    app.register_blueprint(queues.bp)  # /api/queues: the operations page's queue view
    openapi.check_documented(app)  # a route without @documented stops the app here
    # The progress subscriber starts here, in the serving process: gunicorn imports the app
    # after fork (never run it with --preload); Live also restarts it if the pid changes.
    app.extensions["modelbay"].live.ensure_started()
    return app
