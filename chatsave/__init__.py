"""chatsave: keep chat histories safe; a local chat store and a backend kept in agreement."""

from __future__ import annotations

__version__ = "0.1.0"
