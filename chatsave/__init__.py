"""chatsave: keep chat histories safe; a local chat store and a backend kept in agreement.

The command line is a thin layer over this library: ``import chatsave`` gives Python
callers the same operations. Names are imported lazily, so ``chatsave --version`` and
``import chatsave`` stay fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0"

_EXPORTS: dict[str, str] = {
    # model and normalisation
    "Message": "chatsave.model",
    "Chat": "chatsave.model",
    "check_chat_id": "chatsave.model",
    "check_message_id": "chatsave.model",
    "chat_digest": "chatsave.model",
    "normalize_message": "chatsave.normalize",
    "MessageNormalizer": "chatsave.normalize",
    "TimeContext": "chatsave.normalize",
    "parse_time": "chatsave.normalize",
    # errors
    "ChatsaveError": "chatsave.errors",
    "ExitCode": "chatsave.errors",
    # the local store
    "Store": "chatsave.store.store",
    # operations
    "RunResult": "chatsave.ops.result",
    "Source": "chatsave.formats",
    "ImportOptions": "chatsave.ops.importing",
    "import_source": "chatsave.ops.importing",
    "export_chats": "chatsave.ops.exporting",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'chatsave' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
