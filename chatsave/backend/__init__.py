"""The backend core: protocol v1 without a transport (``Service``) over its storage engines
(``storage``: SQLite, PostgreSQL).

The HTTP server (``chatsave.server``) puts it behind FastAPI; the embedded remote
(``chatsave.remote.embedded``) calls it in-process. Neither of those imports the other,
and this package imports neither (docs/architecture.md).
"""

#: the user a backend without tokens serves (the embedded backend's only user)
LOCAL_USER = "local"
