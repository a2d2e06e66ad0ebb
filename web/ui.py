"""``/``: the operations page (plain HTML/JS/CSS in ``web/static``, no build step).

The page's files need no key, so a browser can load them behind ``MODELBAY_API_KEYS``; the
data they fetch does (the key is typed into the page and kept in the browser).
"""
from __future__ import annotations

from pathlib import Path

from flask import Blueprint, send_from_directory

from web.openapi import Ok, documented

STATIC = Path(__file__).with_name("static")
bp = Blueprint("ui", __name__)


@bp.get("/")
@documented("ui", "The operations page (HTML; its data calls need the key)",
            Ok(200, None, "the page", media="text/html"), open=True)
def index():
    return send_from_directory(STATIC, "index.html", max_age=0)


@bp.get("/ui/<name>")
@documented("ui", "A file of the operations page (JS, CSS)", Ok(200, None, "the file", media="*/*"),
            errors=(404,), open=True)
def asset(name: str):
    return send_from_directory(STATIC, name, max_age=0)
