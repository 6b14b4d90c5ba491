"""Is the process that owns a run, job or export still there? (one home for the liveness check)

Owners are recorded as ``host:pid[:token]``. On this host a pid can be probed with signal 0;
another host's processes cannot be seen from here, so callers decide with a heartbeat or age.
"""
from __future__ import annotations

import os
import socket

__all__ = ["hostname", "owner_tag", "split_owner", "pid_alive"]


def hostname() -> str:
    return socket.gethostname()[:100]


def owner_tag() -> str:
    """'host:pid' of this process."""
    return f"{hostname()}:{os.getpid()}"


def split_owner(owner: str) -> tuple[str, int | None, str]:
    """(host, pid or None when unreadable, token) of an owner string 'host:pid[:token]'."""
    host, _, rest = owner.partition(":")
    pid_s, _, token = rest.partition(":")
    try:
        return host, int(pid_s), token
    except ValueError:
        return host, None, token


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (one owned by another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True
