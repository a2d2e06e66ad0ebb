"""Has the HTTP client gone away? Checked while a request waits without writing anything.

gunicorn's gthread worker puts the client socket in the WSGI environ as ``gunicorn.socket``.
A socket whose peer closed is readable and ``recv(1, MSG_PEEK)`` returns ``b""``; peeking
consumes nothing, so a pipelined next request is left alone. Behind nginx this holds with
``proxy_ignore_client_abort off`` (its default): nginx closes the upstream connection when
its client goes. Other servers (the Flask test client, werkzeug) give no socket: the answer
is then always "still there". While streaming, a failed write is the signal instead (gunicorn
closes the response generator).
"""
from __future__ import annotations

import select
import socket
from collections.abc import Mapping
from typing import Any


def client_gone(environ: Mapping[str, Any]) -> bool:
    """True when the client of this request closed its connection."""
    sock = environ.get("gunicorn.socket")
    if sock is None or not isinstance(sock, socket.socket):
        return False
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        if not readable:
            return False
        return sock.recv(1, socket.MSG_PEEK) == b""
    except (ValueError, BlockingIOError):  # an SSL socket cannot peek; nothing to read after all
        return False
    except OSError:  # reset by peer, or closed under us
        return True
