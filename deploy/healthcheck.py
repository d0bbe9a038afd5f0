"""The image's HEALTHCHECK: exit 0 when the process's ``GET /ok`` answers 200, else 1.

A container runs one process: ``nimbus serve`` (``/ok`` on NIMBUS_PORT, 8123) or
``nimbus worker`` (``/ok`` on NIMBUS_WORKER_PORT, 8124). The first of the two ports that
accepts a connection is the one to ask; any other failure (503 while the database is
unreachable, a timeout) is unhealthy. Standard library only: slim images have no curl.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

TIMEOUT_S = 4.0


def check(port: str) -> bool | None:
    """True or False for the answer of ``/ok`` on ``port``; None when nothing listens there."""
    # No proxies: HTTP_PROXY set for the model endpoint must not capture a loopback probe.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://127.0.0.1:{port}/ok", timeout=TIMEOUT_S) as response:
            return bool(response.status == 200)
    except urllib.error.HTTPError as exc:
        print(f"healthcheck: /ok on port {port} answered {exc.code}", file=sys.stderr)
        return False
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, ConnectionRefusedError):
            return None
        print(f"healthcheck: /ok on port {port}: {exc.reason}", file=sys.stderr)
        return False
    except OSError as exc:  # a timeout while reading the answer
        print(f"healthcheck: /ok on port {port}: {exc}", file=sys.stderr)
        return False


def main() -> int:
    """Ask the API's port, then the worker's; 0 when the one that listens is healthy."""
    for port in (
        os.environ.get("NIMBUS_PORT", "8123"),
        os.environ.get("NIMBUS_WORKER_PORT", "8124"),
    ):
        healthy = check(port)
        if healthy is not None:
            return 0 if healthy else 1
    print("healthcheck: nothing listens on the API or the worker port", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
