"""Listening sockets for ``serve``: bound before anything else starts, with an error that
says why a port cannot be had (in use, and by whom when it can be found; not an address of
this machine; privileged)."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from pathlib import Path

from chatsave.errors import ListenError

DEFAULT_HOST = "127.0.0.1"
#: listen(2) backlog of the sockets serve binds (uvicorn's default)
BACKLOG = 2048


def url_of(sock: socket.socket) -> str:
    """``http://host:port`` of a listening socket (IPv6 addresses in brackets)."""
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _parent(pid: int) -> int | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        # /proc/PID/stat: "PID (COMM) STATE PPID ..."; COMM may hold spaces and parentheses
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    return None


def _port_holder(port: int) -> str | None:
    """Who listens on TCP ``port``, from /proc (Linux): "another chatsave server (pid N)",
    "pid N (NAME)", "a process of user NAME" (other users' processes are not visible), or
    None. Command lines are not shown: they may hold secrets (a database URL's password)."""
    listeners: dict[str, int] = {}  # socket inode -> uid
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    listeners[fields[9]] = int(fields[7])  # 0A: LISTEN
    if not listeners:
        return None
    wanted = {f"socket:[{inode}]" for inode in listeners}
    holders = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):  # gone, or another user's process
            if any(os.readlink(fd) in wanted for fd in (proc / "fd").iterdir()):
                holders.append(int(proc.name))
    if not holders:
        import pwd

        uid = next(iter(listeners.values()))
        try:
            return f"a process of user {pwd.getpwuid(uid).pw_name}"
        except KeyError:
            return f"a process of uid {uid}"
    # Workers share their supervisor's socket: name the holder whose parent holds none.
    pid = min(holders, key=lambda h: (_parent(h) in holders, h))
    try:
        argv = (Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
                .split("\0"))
        name = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return f"pid {pid}"
    if "chatsave.server.run" in argv or any(
            Path(arg).name == "chatsave" and argv[i + 1:i + 2] == ["serve"]
            for i, arg in enumerate(argv)):
        return f"another chatsave server (pid {pid})"
    return f"pid {pid} ({name})"


def listen_error(host: str, port: int, exc: OSError) -> ListenError:
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if exc.errno == errno.EADDRINUSE:
        holder = _port_holder(port)
        return ListenError(
            f"{where} is already in use" + (f" by {holder}" if holder else ""),
            hint="stop what listens there, or choose another port with --port")
    if exc.errno == errno.EADDRNOTAVAIL:
        return ListenError(f"cannot listen on {where}: {host} is not an address of this machine",
                           hint="use an address of one of its interfaces, or 127.0.0.1")
    if exc.errno == errno.EACCES:
        return ListenError(f"cannot listen on {where}: permission denied",
                           hint="ports below 1024 need privileges; choose a port above 1023")
    return ListenError(f"cannot listen on {where}: {exc.strerror or exc}")


def listen_sockets(host: str, port: int) -> list[socket.socket]:
    """Listening sockets on every address ``host`` resolves to (port 0: any free port).

    Raises ``ListenError`` when the port is in use (naming its holder when it can be found),
    the address is not this machine's, or the port needs privileges.
    """
    bare = host.strip("[]") or None
    try:
        infos = socket.getaddrinfo(bare, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ListenError(f"cannot listen on {host}: {exc.strerror}",
                          hint="--host takes an address or a name of this machine") from exc
    addresses = list(dict.fromkeys((family, address) for family, _t, _p, _c, address in infos))
    sockets: list[socket.socket] = []
    unavailable: ListenError | None = None
    try:
        for family, address in addresses:
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and len(addresses) > 1:
                # Beside an IPv4 socket on the same port (as asyncio does): no dual stack.
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
                sock.listen(BACKLOG)  # in use by a bound, not yet listening socket: here
            except OSError as exc:
                error = listen_error(str(address[0]), int(address[1]), exc)
                if exc.errno != errno.EADDRNOTAVAIL or len(addresses) == 1:
                    raise error from exc
                # That family is not enabled here: go on with the others (asyncio's rule).
                sockets.pop().close()
                unavailable = error
                continue
            sock.set_inheritable(True)  # for worker processes
        if not sockets and unavailable is not None:
            raise unavailable
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets
