"""The JSON alert upstream systems may publish on `ebc/v1/{d}/alerts/in` (schema in the README)."""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError

from ebcd.ingest import MAX_PAYLOAD_BYTES, IngestError, Reason
from ebcd.model import events
from ebcd.model.alert import AlertRequest, parse_target

MAX_JSON_DEPTH = 32
_ALIASES = {"msgType": "msg_type", "event": "event_type", "ttl": "ttl_s"}


def parse_json_alert(payload: bytes, max_bytes: int = MAX_PAYLOAD_BYTES) -> AlertRequest:
    """Parse and validate a JSON alert; raise IngestError with a reason and the field at fault."""
    if len(payload) > max_bytes:
        raise IngestError(Reason.TOO_LARGE, f"payload of {len(payload)} bytes exceeds {max_bytes}")
    try:
        raw = json.loads(payload)
    except RecursionError:
        raise IngestError(Reason.MALFORMED_JSON, "nesting too deep") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise IngestError(Reason.MALFORMED_JSON, f"not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise IngestError(Reason.SCHEMA, f"the alert must be a JSON object, got {type(raw).__name__}")
    if _depth(raw) > MAX_JSON_DEPTH:
        raise IngestError(Reason.MALFORMED_JSON, f"nesting deeper than {MAX_JSON_DEPTH} levels")
    identifier = raw.get("identifier") if isinstance(raw.get("identifier"), str) else None
    data = {_ALIASES.get(k, k): v for k, v in raw.items()}
    if isinstance(data.get("msg_type"), str):
        data["msg_type"] = data["msg_type"].lower()
    event = data.get("event_type")
    if isinstance(event, str) and len(event) == 5 and events.lookup(event) is None:
        raise IngestError(
            Reason.UNKNOWN_EVENT, f"event_type {event!r} is not in the event type table", identifier
        )
    targets = data.get("targets")
    if isinstance(targets, list):
        data["targets"] = [_target(t, i, identifier) for i, t in enumerate(targets)]
    try:
        return AlertRequest.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"]) or "alert"
        raise IngestError(Reason.SCHEMA, f"{loc}: {err['msg']}", identifier) from None


def _target(t: Any, i: int, identifier: str | None) -> Any:
    if isinstance(t, str):
        try:
            return parse_target(t)
        except ValueError as e:
            raise IngestError(Reason.UNKNOWN_TARGET, f"targets[{i}]: {e}", identifier) from None
    return t


def _depth(obj: Any, level: int = 0) -> int:
    if level > MAX_JSON_DEPTH:
        return level
    if isinstance(obj, dict):
        return max((_depth(v, level + 1) for v in obj.values()), default=level)
    if isinstance(obj, list):
        return max((_depth(v, level + 1) for v in obj), default=level)
    return level
