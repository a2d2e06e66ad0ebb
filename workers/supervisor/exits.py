"""How a process ended, in words: "exited with code 3", "was killed by SIGSEGV (signal 11)".

``subprocess`` reports death by a signal as a negative return code; a shell reports it as
128 + the signal number. Messages name the signal, never a bare "code -11".
"""
from __future__ import annotations

import signal


def describe_exit(returncode: int) -> str:
    """``returncode`` (``Popen.returncode``: negative = killed by that signal) in words."""
    if returncode < 0:
        number = -returncode
        try:
            name = signal.Signals(number).name
        except ValueError:
            return f"was killed by signal {number}"
        return f"was killed by {name} (signal {number})"
    return f"exited with code {returncode}"
