"""Whether the listeners can bind, checked before the model loads.

gRPC reports a taken port as "Failed to bind to address" once the model has loaded (minutes, on a big model); a
plain socket bound the same way (SO_REUSEADDR, as both servers set it) says why at once, and the message names the
port and the option that sets it.
"""

from __future__ import annotations

import errno
import socket

from runtime.config import ConfigError


def check_bindable(host: str, port: int, what: str, option: str) -> None:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(f"{what} port {port} on {host} is already in use: stop what listens there or choose "
                              f"another port with {option}") from exc
        raise ConfigError(f"cannot listen on {host}:{port} for {what} ({exc.strerror or exc}): check --host and "
                          f"{option}") from exc
