"""The data model: chat and message ids, the Message and Chat records, content hashing."""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from functools import cached_property
from operator import itemgetter
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from chatsave.errors import InvalidIdError

ROLES: tuple[str, ...] = ("user", "assistant", "system", "tool")
Role = Literal["user", "assistant", "system", "tool"]

CHAT_ID_MAX = 128
MESSAGE_ID_MAX = 256
#: the longest message type
TYPE_MAX = 128
_CHAT_ID_RE = re.compile(r"[A-Za-z0-9._:@~-]+")
_CHAT_ID_BAD_CHARS = re.compile(r"[^A-Za-z0-9._:@~-]")
# Unicode category Cc (C0, DEL, C1 controls) and Cs (lone surrogates), as regexes: fast.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
_SURROGATE = re.compile("[\ud800-\udfff]")
# Values that a broken client writes where an id should be: never ids.
RESERVED_IDS = frozenset({"null", "undefined", "none", "nan"})


def _quote(value: object) -> str:
    """Quote a rejected value for an error message, bounded and with controls escaped."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def chat_id_problem(value: object) -> str | None:
    """Say why ``value`` is not a valid chat id, or ``None`` when it is one."""
    if not isinstance(value, str):
        return f"not a string ({type(value).__name__})"
    if value.strip() == "":
        return "blank"
    if value.lower() in RESERVED_IDS:
        return "a placeholder, not an id"
    if len(value) > CHAT_ID_MAX:
        return f"longer than {CHAT_ID_MAX} characters"
    if value in (".", ".."):
        return "a path component, not an id"
    if not _CHAT_ID_RE.fullmatch(value):
        bad = sorted(set(_CHAT_ID_BAD_CHARS.findall(value)))
        shown = "".join(bad[:8]).encode("unicode_escape").decode("ascii")
        return f"contains characters outside [A-Za-z0-9._:@~-] ({shown!r})"
    return None


def check_chat_id(value: object) -> str:
    """Return ``value`` if it is a valid chat id; raise InvalidIdError quoting it otherwise."""
    problem = chat_id_problem(value)
    if problem is not None:
        raise InvalidIdError(
            f"invalid chat id {_quote(value)}: {problem}",
            hint="chat ids are 1-128 characters from A-Z a-z 0-9 . _ : @ ~ - ; "
            "import --rename-invalid maps a bad id to a valid one",
        )
    return value  # type: ignore[return-value]


def message_id_problem(value: object) -> str | None:
    """Say why ``value`` is not a valid message id, or ``None`` when it is one."""
    if not isinstance(value, str):
        return f"not a string ({type(value).__name__})"
    if value.strip() == "":
        return "blank"
    if value.lower() in RESERVED_IDS:
        # What a broken client writes where it had no id; import derives a real one
        # instead, so such an id could never come back unchanged from an export.
        return "a placeholder, not an id"
    if len(value) > MESSAGE_ID_MAX:
        return f"longer than {MESSAGE_ID_MAX} characters"
    if _CONTROL.search(value):
        return "contains control characters"
    if _SURROGATE.search(value):
        # Lone surrogates (from JSON "\\ud800" escapes) cannot be stored or sent as UTF-8.
        return "contains an unpaired surrogate (not valid Unicode)"
    return None


def check_message_id(value: object) -> str:
    """Return ``value`` if it is a valid message id; raise InvalidIdError otherwise."""
    problem = message_id_problem(value)
    if problem is not None:
        raise InvalidIdError(f"invalid message id {_quote(value)}: {problem}")
    return value  # type: ignore[return-value]


def renamed_chat_id(original: object) -> str:
    """A valid, deterministic replacement for an invalid chat id (``import --rename-invalid``).

    Readable where it can be (the allowed characters of the original survive), and
    unique by a hash of the original, so the same bad id always maps to the same new one.
    """
    text = original if isinstance(original, str) else json.dumps(original)
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:10]
    stem = _CHAT_ID_BAD_CHARS.sub("_", text).strip("._") or "chat"
    return f"{stem[:100]}~{digest}"


ChatId = Annotated[str, AfterValidator(check_chat_id)]
MessageId = Annotated[str, AfterValidator(check_message_id)]


#: a time exactly as format_time writes it: ASCII digits, milliseconds, Z (a real day and
#: time only if it also parses)
STORED_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{3}Z")


def format_time(value: datetime) -> str:
    """UTC, millisecond precision, ``Z``: the one time format chatsave writes."""
    value = value.astimezone(UTC)
    # Not strftime: its %Y does not zero-pad years before 1000 on every platform, and
    # "999-01-01T..." is not ISO 8601 (it would not parse back).
    return (f"{value.year:04d}-{value.month:02d}-{value.day:02d}T{value.hour:02d}:"
            f"{value.minute:02d}:{value.second:02d}.{value.microsecond // 1000:03d}Z")


def to_millis(value: datetime) -> datetime:
    """Truncate to whole milliseconds in UTC, as every stored time is."""
    try:
        value = value.astimezone(UTC)
    except OverflowError:
        # Year 1 or 9999 shifted past the ends of the calendar by its offset.
        raise ValueError(f"time out of range: {value.isoformat()}") from None
    return value.replace(microsecond=value.microsecond // 1000 * 1000)


# The hash the protocol depends on is defined by this public call (docs/protocol.md):
#   json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
#              allow_nan=False)
_CANONICAL_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"),
                                      ensure_ascii=False, allow_nan=False)


def _fast_canonical_encoder() -> Callable[[Any, int], Any] | None:
    """The C encoder behind json.dumps, built once with the options above; None where the
    interpreter has none (or one with another signature): the public encoder is then used.

    ``json.encoder.c_make_encoder`` is private CPython API, kept because nothing public is
    as fast: json.dumps, or even a JSONEncoder built once, builds a C encoder on every call
    (a content hash is 16-22% slower with the fastest public call, measured on 100k
    messages; the server hashes every message it saves). tests/test_hash_encoder.py shows
    on random values that its text equals the json.dumps call above, with it and without it.
    No circular-reference bookkeeping here: a cycle or a deep nest ends in RecursionError,
    and canonical_json then raises exactly what json.dumps raises (ValueError for a cycle).
    """
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:
        return None
    try:
        encoder: Callable[[Any, int], Any] = make(
            None, _CANONICAL_ENCODER.default, json.encoder.encode_basestring, None, ":", ",",
            True, False, False)
    except TypeError:  # another CPython's private signature: the public path is correct
        return None
    return encoder


_CANONICAL_C = _fast_canonical_encoder()


def canonical_json(value: Any) -> str:
    """The canonical JSON text that hashes are computed over (sorted keys, no spaces)."""
    if _CANONICAL_C is None:
        return _CANONICAL_ENCODER.encode(value)
    try:
        return "".join(_CANONICAL_C(value, 0))
    except RecursionError:
        return _CANONICAL_ENCODER.encode(value)


def canonical_numbers(value: Any) -> Any:
    """Integral floats as integers, as JavaScript writes them (``1.0`` -> ``1``, as in JCS).

    A browser that reads ``{"v": 1.0}`` writes back ``{"v": 1}``: both must hash the same.
    """
    if isinstance(value, float) and value.is_integer() and abs(value) <= 2 ** 53:
        return int(value)
    if isinstance(value, dict):
        return {k: canonical_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [canonical_numbers(v) for v in value]
    return value


def content_hash(role: str, content: str, created_at: str, type_: str,
                 metadata: Any, attachments: Any) -> str:
    """sha256 over the canonical JSON of the semantic fields (not the id, not ``extra``)."""
    text = hash_text(role, content, created_at, type_, metadata, attachments)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def hash_text(role: str, content: str, created_at: str, type_: str, metadata: Any,
              attachments: Any) -> str:
    """The text a content hash is computed over: the canonical JSON of
    ``{"attachments", "content", "created_at", "metadata", "role", "type"}``, numbers in
    metadata and attachments as ``canonical_numbers`` writes them."""
    if type(role) is type(content) is type(created_at) is type(type_) is str:
        return _hashed(_numbers_text(attachments), _str(content), _str(created_at),
                       _numbers_text(metadata), _str(role), _str(type_))
    return canonical_json({
        "attachments": canonical_numbers(attachments) if attachments else attachments,
        "content": content,
        "created_at": created_at,
        "metadata": canonical_numbers(metadata) if metadata else metadata,
        "role": role,
        "type": type_,
    })


def message_texts(role: str, content: str, created_at: str, type_: str, metadata: Any,
                  attachments: Any, extra: Any, inexact: bool) -> tuple[str, str]:
    """(body, content hash) of a message: the body is the canonical JSON of its wire object
    without chat_id and id (``inexact`` only when set), what a backend stores. Built from
    the fields' texts, each encoded once: the hash text shares all of them unless
    metadata or attachments hold integral floats (``canonical_numbers``)."""
    if not (type(role) is type(content) is type(created_at) is type(type_) is str):
        body: dict[str, Any] = {
            "role": role, "content": content, "created_at": created_at, "type": type_,
            "metadata": metadata, "attachments": attachments, "extra": extra}
        if inexact:
            body["inexact"] = True
        return canonical_json(body), content_hash(role, content, created_at, type_,
                                                  metadata, attachments)
    att, meta = _container_text(attachments), _container_text(metadata)
    text, when, who, kind = _str(content), _str(created_at), _str(role), _str(type_)
    flag = '"inexact":true,' if inexact else ""
    body_text = (f'{{"attachments":{att},"content":{text},"created_at":{when},'
                 f'"extra":{_container_text(extra)},{flag}"metadata":{meta},"role":{who},'
                 f'"type":{kind}}}')
    hashed = _hashed(_numbers_text(attachments, att), text, when,
                     _numbers_text(metadata, meta), who, kind)
    return body_text, hashlib.sha256(hashed.encode("utf-8")).hexdigest()


def _hashed(attachments: str, content: str, created_at: str, metadata: str, role: str,
            type_: str) -> str:
    """The hash text from its fields' JSON texts (keys in canonical order)."""
    return (f'{{"attachments":{attachments},"content":{content},"created_at":{created_at},'
            f'"metadata":{metadata},"role":{role},"type":{type_}}}')


#: the string encoder canonical_json uses (ensure_ascii=False): quotes and escapes
_str: Callable[[str], str] = json.encoder.encode_basestring


def _container_text(value: Any) -> str:
    """canonical_json(value), the empty containers spelled without calling it."""
    if not value and type(value) in (dict, list):
        return "{}" if type(value) is dict else "[]"
    return canonical_json(value)


def _numbers_text(value: Any, text: str | None = None) -> str:
    """canonical_json(canonical_numbers(value)): ``text`` (value's canonical JSON, made
    here if not given) unless an integral float needs rewriting (a falsy value is kept as
    it is, as content_hash keeps it)."""
    if value and _integral_floats(value):
        return canonical_json(canonical_numbers(value))
    return _container_text(value) if text is None else text


def _integral_floats(value: Any) -> bool:
    """True if ``canonical_numbers`` would rewrite a number in ``value``."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, float):
            if item.is_integer() and abs(item) <= 2 ** 53:
                return True
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def fingerprint(role: str, type_: str, content: str) -> str:
    """Time-free fingerprint (role, type, text): what duplicate detection compares."""
    doc = [role, type_, content]
    return hashlib.sha256(canonical_json(doc).encode("utf-8")).hexdigest()


def derived_message_id(chat_id: str, role: str, content: str, created_at: str,
                       ordinal: int) -> str:
    """Deterministic id for a message that has none.

    Derived from chat id, role, content, time and the ordinal among identical messages
    (same role, content and time) in the source, so importing the same dump twice gives
    the same ids while two genuinely repeated messages stay two.
    """
    doc = [chat_id, role, content, created_at, ordinal]
    digest = hashlib.sha256(canonical_json(doc).encode("utf-8")).hexdigest()
    return "m-" + digest[:32]


_MISSING = object()

if TYPE_CHECKING:
    _cached = cached_property
else:
    class _cached(cached_property):
        """functools.cached_property without its per-class lock (Python 3.11 takes an RLock
        on every first access; profiled: a few percent of the server's save, which reads
        two such properties per message). Computing a value twice in a race is harmless:
        the properties are pure functions of a frozen model."""

        def __get__(self, instance: Any, owner: type | None = None) -> Any:
            if instance is None:
                return self
            cache = instance.__dict__
            value = cache.get(self.attrname, _MISSING)
            if value is _MISSING:  # not try/except KeyError: raising it costs as much
                value = cache[self.attrname] = self.func(instance)
            return value


class Message(BaseModel):
    """One chat message in chatsave's own shape (the flat wire/JSONL object)."""

    model_config = ConfigDict(frozen=True, extra="forbid", ignored_types=(_cached,))

    chat_id: ChatId
    id: MessageId
    role: Role
    content: str
    created_at: datetime
    type: str = Field(default="message", min_length=1, max_length=TYPE_MAX)
    metadata: dict[str, Any] = Field(default_factory=dict)
    attachments: list[Any] = Field(default_factory=list)
    extra: dict[str, Any] = Field(default_factory=dict)
    # True when the time was reconstructed (a time-only string completed with --date).
    inexact: bool = False

    @field_validator("created_at")
    @classmethod
    def _utc_millis(cls, value: datetime) -> datetime:
        if value.tzinfo is None:
            raise ValueError("created_at must carry a time zone")
        return to_millis(value)

    @_cached
    def created_at_text(self) -> str:
        return format_time(self.created_at)

    @_cached
    def content_hash(self) -> str:
        return content_hash(self.role, self.content, self.created_at_text, self.type,
                            self.metadata, self.attachments)

    @_cached
    def fingerprint(self) -> str:
        return fingerprint(self.role, self.type, self.content)

    def to_wire(self) -> dict[str, Any]:
        """The flat object of the wire and JSONL format (docs/protocol.md; ``inexact`` only
        when set)."""
        out: dict[str, Any] = {
            "chat_id": self.chat_id,
            "id": self.id,
            "role": self.role,
            "content": self.content,
            "created_at": self.created_at_text,
            "type": self.type,
            "metadata": self.metadata,
            "attachments": self.attachments,
            "extra": self.extra,
        }
        if self.inexact:
            out["inexact"] = True
        return out


class Chat(BaseModel):
    """A chat as the local store knows it."""

    model_config = ConfigDict(frozen=True)

    chat_id: ChatId
    title: str | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None


def digest_of_sorted_lines(lines: Iterable[str]) -> str:
    """chat_digest for ``id:content_hash`` lines already in order (streamed, any size).

    Databases sort them with a byte-wise (binary / "C") collation: UTF-8 byte order is
    code point order, so that is the order of Python's sorted().
    """
    digest = hashlib.sha256()
    first = True
    for line in lines:
        if not first:
            digest.update(b"\n")
        digest.update(line.encode("utf-8"))
        first = False
    return digest.hexdigest()


def chat_digest(pairs: Iterable[tuple[str, str]]) -> str:
    """Digest of a chat's live messages: sha256 over the sorted ``id:content_hash`` lines.

    Lines are joined with ``\\n`` (no trailing newline); an empty chat has the digest of "".
    Client and server compute it the same way, so equal digests mean equal chats.
    """
    lines = sorted(f"{mid}:{chash}" for mid, chash in pairs)
    return hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()


def bucket_digests(rows: Iterable[tuple[str, str]]) -> dict[str, str]:
    """The digest of each bucket (docs/protocol.md, "Buckets"): from (bucket, line) rows
    ordered by bucket, then by line as ``digest_of_sorted_lines`` wants them, where a line
    is ``id:content_hash`` and its bucket the hash's first two hex digits. A bucket's
    digest is the chat digest of its lines alone; a bucket without lines is left out.
    Streamed: one bucket's lines are held at a time, joined and hashed at once."""
    return {bucket: hashlib.sha256("\n".join(line for _, line in group).encode("utf-8"))
            .hexdigest() for bucket, group in itertools.groupby(rows, key=itemgetter(0))}


#: The digest of a chat without live messages.
EMPTY_DIGEST = chat_digest([])
