"""Shared fixtures: an isolated chatsave home, stores, remotes, live servers."""

pytest_plugins: list[str] = []
