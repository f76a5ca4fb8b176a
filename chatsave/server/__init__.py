"""The reference server: protocol v1 over HTTP (FastAPI, uvicorn), in front of the backend
core (chatsave.backend: the Service and its storage engines)."""
