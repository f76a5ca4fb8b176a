"""Which hosts are this machine's loopback: shared by the client and the server.

The client sends a token over plain http only to loopback (``remote/http.py``,
``chatsave login``); the server listens without authentication only on loopback
(``server/run.py``). Both ask the same question, so both use this one answer.
"""

from __future__ import annotations

import ipaddress


def is_loopback(host: str) -> bool:
    """Whether ``host`` names the loopback interface.

    A loopback address (``127.0.0.0/8``, ``::1``; an IPv6 address may be in brackets), or
    the name ``localhost`` (any case, with or without the final dot). Not other names
    ending in ``.localhost``: RFC 6761 asks resolvers to send them to loopback, but a
    system resolver without that rule asks DNS, and the answer could send a token in clear
    text, or open an unauthenticated server, to another machine.
    """
    if host.lower().removesuffix(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
