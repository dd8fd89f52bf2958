"""How every MQTT payload is encoded and decoded: compact JSON of a frozen, typed record with a schema version.

Decoding is the one place untrusted bytes from the broker become Python values. It refuses, with a
ContractError that says what is wrong and never anything else: payloads over the record's size limit
(checked before parsing), bytes that are not UTF-8 JSON, nesting deeper than the parser's limit,
NaN and Infinity, missing or unknown keys, values of the wrong JSON type (strict: "1" is not a
number, true is not 1), strings and lists past their bounds, and other schema versions.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

SCHEMA_VERSION = 1
DEFAULT_MAX_BYTES = 16 * 1024
MAX_ERROR_CHARS = 400  # a ContractError message never echoes more of the input than this

NAME_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"  # agent ids, lines and cameras: single MQTT topic levels
MODEL_PATTERN = r"^[A-Za-z0-9._-]{1,128}@[A-Za-z0-9._+-]{1,64}$"  # model label id@version
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"  # request, transfer and nonce ids; never ".."

Name = Annotated[str, Field(pattern=NAME_PATTERN, description="A single topic level: letters, digits, '_' or '-'.")]
ModelLabel = Annotated[str, Field(pattern=MODEL_PATTERN, description="A model as `model_id@model_version`.")]
Identifier = Annotated[str, Field(pattern=ID_PATTERN)]
Text = Annotated[str, Field(max_length=500, description="Human-readable text, at most 500 characters.")]
UnixTime = Annotated[float, Field(ge=0, description="Seconds since 1970-01-01 UTC.")]


class ContractError(ValueError):
    """A payload does not meet the MQTT contract: the message says which record, which key and what is wrong."""


class Part(BaseModel):
    """A typed, frozen piece of a record: unknown keys, wrong JSON types and non-finite numbers are refused."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class Record(Part):
    """A whole MQTT payload: a Part with a schema version `v` and a size limit."""

    MAX_BYTES: ClassVar[int] = DEFAULT_MAX_BYTES

    v: Literal[1] = Field(1, description="Schema version of this record (SCHEMA_VERSION).")

    def encode(self) -> bytes:
        """Compact JSON; ContractError if it would exceed the record's size limit (a reader would refuse it)."""
        data = self.model_dump_json().encode()
        if len(data) > self.MAX_BYTES:
            msg = f"{type(self).__name__} encodes to {len(data)} bytes; the contract allows {self.MAX_BYTES}"
            raise ContractError(msg)
        return data


R = TypeVar("R", bound=Record)

_VERSION = re.compile(rb'"v"\s*:\s*(-?[0-9]+)')


def decode(record_type: type[R], payload: bytes | bytearray | memoryview) -> R:
    """Parse one payload as `record_type`; ContractError (only) for anything that does not meet the contract."""
    name = record_type.__name__
    size = len(payload)
    if size > record_type.MAX_BYTES:
        msg = f"{name} payload is {size} bytes; the contract allows {record_type.MAX_BYTES}"
        raise ContractError(msg)
    data = bytes(payload)
    try:
        return record_type.model_validate_json(data)
    except ValidationError as error:
        raise ContractError(_explain(name, data, error)) from None
    except (
        ValueError,
        TypeError,
        RecursionError,
    ) as error:  # pydantic-core reports all as ValidationError; belt and braces
        msg = f"{name} payload cannot be parsed: {type(error).__name__}"
        raise ContractError(msg) from None


def decode_object(record_type: type[R], values: dict[str, Any]) -> R:
    """Validate already-parsed values (MQTT 5 user properties, a file) as `record_type`, not strictly typed."""
    try:
        return record_type.model_validate(values, strict=False)
    except ValidationError as error:
        raise ContractError(_explain(record_type.__name__, b"", error)) from None


def _explain(name: str, data: bytes, error: ValidationError) -> str:
    version = _VERSION.search(data[:4096])
    if version is not None and int(version.group(1)) != SCHEMA_VERSION:
        return (
            f"{name} has schema version {int(version.group(1))}; this reader knows {SCHEMA_VERSION}: "
            "are the sender and the receiver the same Lineguard version?"
        )
    problems = [_problem(each) for each in error.errors(include_url=False)[:5]]
    more = f" (+{error.error_count() - 5} more)" if error.error_count() > 5 else ""
    return clip(f"{name} payload refused: {'; '.join(problems)}{more}", MAX_ERROR_CHARS)


def _problem(entry: Any) -> str:
    where = ".".join(str(part) for part in entry["loc"]) or "(payload)"
    if entry["type"] == "extra_forbidden":
        return f"{clip(where, 60)}: unknown key"
    if entry["type"] == "missing":
        return f"{where}: missing"
    if entry["type"] == "json_invalid":
        return f"not valid JSON ({clip(str(entry['msg']), 120)})"
    got = entry.get("input")
    shown = "" if isinstance(got, dict | list) else f" (got {clip(repr(got), 40)})"
    return f"{clip(where, 60)}: {entry['msg']}{shown}"


def clip(text: str, limit: int) -> str:
    """`text` cut to at most `limit` characters (an ellipsis marks the cut): for anything echoed from input."""
    return text if len(text) <= limit else text[: max(limit - 1, 0)] + "…"
