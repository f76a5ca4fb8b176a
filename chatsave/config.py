"""Settings: where the store and config live, and flag > environment > config file > default."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chatsave.errors import UsageError

APP = "chatsave"
# Config file keys and the environment variables that override them.
KEYS: dict[str, str] = {
    "store": "CHATSAVE_STORE",
    "remote": "CHATSAVE_REMOTE",
    "token_file": "CHATSAVE_TOKEN_FILE",
    "lock_wait": "CHATSAVE_LOCK_WAIT",
    "tz": "CHATSAVE_TZ",
    "budget": "CHATSAVE_BUDGET",
    "request_timeout": "CHATSAVE_REQUEST_TIMEOUT",
    "retry_attempts": "CHATSAVE_RETRY_ATTEMPTS",
    "autobot_cache": "CHATSAVE_AUTOBOT_CACHE",
    "metrics_file": "CHATSAVE_METRICS_FILE",
}
# What a user can say of AutoBot's Redis session cache before autobot-dir writes files.
AUTOBOT_CACHE_VALUES = ("on", "off")


def home_dir(env: Mapping[str, str] = os.environ) -> Path | None:
    value = env.get("CHATSAVE_HOME")
    return Path(value).expanduser() if value else None


def data_dir(env: Mapping[str, str] = os.environ) -> Path:
    """Where the store lives by default: $CHATSAVE_HOME, else the platform's user data dir."""
    home = home_dir(env)
    if home is not None:
        return home
    import platformdirs

    return Path(platformdirs.user_data_dir(APP, appauthor=False))


def config_path(env: Mapping[str, str] = os.environ) -> Path:
    """$CHATSAVE_CONFIG, else config.toml in $CHATSAVE_HOME or the platform's config dir."""
    explicit = env.get("CHATSAVE_CONFIG")
    if explicit:
        return Path(explicit).expanduser()
    home = home_dir(env)
    if home is not None:
        return home / "config.toml"
    import platformdirs

    return Path(platformdirs.user_config_dir(APP, appauthor=False)) / "config.toml"


def read_config(path: Path) -> dict[str, Any]:
    """The config file's settings; a missing file is empty, a broken one a usage error."""
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        return {}
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"config file {path} is not valid TOML: {exc}",
                         hint="fix or remove the file") from None
    except OSError as exc:
        raise UsageError(f"cannot read config file {path}: {exc.strerror}") from None
    unknown = sorted(set(data) - set(KEYS))
    if unknown:
        raise UsageError(f"config file {path}: unknown key(s) {', '.join(unknown)}",
                         hint=f"known keys: {', '.join(sorted(KEYS))}")
    return data


@dataclass
class Settings:
    """Resolved settings; ``sources`` tells where each value came from."""

    store: Path
    remote: str | None = None
    token_file: Path | None = None
    lock_wait: float = 0.0
    tz: str | None = None
    budget: str | None = None
    # Total deadline of one HTTP request, and attempts per request (transient failures).
    request_timeout: float = 60.0
    retry_attempts: int = 5
    # "off": AutoBot is stopped, runs without its session cache, or had it flushed, so a
    # chat file chatsave writes is what AutoBot reads next. None: nobody said.
    autobot_cache: str | None = None
    # Where each run records itself for node_exporter's textfile collector (chatsave.metrics_file).
    metrics_file: Path | None = None
    config_file: Path | None = None
    sources: dict[str, str] = field(default_factory=dict)


def _number(values: Mapping[str, Any], sources: Mapping[str, str], key: str, default: float,
            kind: type, minimum: float) -> float:
    raw = values.get(key, default)
    try:
        value = kind(raw)
        if value < minimum:
            raise ValueError
    except (TypeError, ValueError):
        raise UsageError(f"{key} must be a number >= {minimum:g}, got {raw!r} "
                         f"({sources.get(key)})") from None
    return float(value)


def resolve(flags: Mapping[str, Any], env: Mapping[str, str] = os.environ) -> Settings:
    """Merge flags (None = not given) over environment over config file over defaults."""
    cfg_path = config_path(env)
    config = read_config(cfg_path)
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for key, env_name in KEYS.items():
        if flags.get(key) is not None:
            values[key], sources[key] = flags[key], "flag"
        elif env.get(env_name):
            values[key], sources[key] = env[env_name], f"env {env_name}"
        elif key in config:
            values[key], sources[key] = config[key], f"config {cfg_path}"
    store = values.get("store")
    if store is None:
        store, sources["store"] = data_dir(env) / "store.db", "default"
    lock_wait = values.get("lock_wait", 0.0)
    try:
        lock_wait = float(lock_wait)
        if lock_wait < 0:
            raise ValueError
    except (TypeError, ValueError):
        raise UsageError(f"lock wait must be a number of seconds >= 0, got {lock_wait!r} "
                         f"({sources.get('lock_wait')})") from None
    token_file = values.get("token_file")
    request_timeout = _number(values, sources, "request_timeout", 60.0, float, 0.1)
    retry_attempts = int(_number(values, sources, "retry_attempts", 5, int, 1))
    autobot_cache = str(values["autobot_cache"]).strip().lower() \
        if values.get("autobot_cache") else None
    if autobot_cache is not None and autobot_cache not in AUTOBOT_CACHE_VALUES:
        raise UsageError(f"autobot_cache must be 'on' or 'off', got {values['autobot_cache']!r} "
                         f"({sources.get('autobot_cache')})")
    return Settings(
        store=Path(str(store)).expanduser(),
        remote=str(values["remote"]) if values.get("remote") else None,
        token_file=Path(str(token_file)).expanduser() if token_file else None,
        lock_wait=lock_wait,
        tz=str(values["tz"]) if values.get("tz") else None,
        budget=str(values["budget"]) if values.get("budget") else None,
        request_timeout=request_timeout,
        retry_attempts=retry_attempts,
        autobot_cache=autobot_cache,
        metrics_file=Path(str(values["metrics_file"])).expanduser()
        if values.get("metrics_file") else None,
        config_file=cfg_path,
        sources=sources,
    )


def make_private_dirs(directory: Path) -> None:
    """Create ``directory`` and any missing parents, each 0700 whatever the umask (those
    that exist are left as they are)."""
    missing: list[Path] = []
    for d in (directory, *directory.parents):
        if d.exists():
            break
        missing.append(d)
    for d in reversed(missing):
        try:
            d.mkdir(mode=0o700)
        except FileExistsError:  # made meanwhile by someone else: theirs
            continue
        os.chmod(d, 0o700)
