"""The control socket's requests, typed: what each op takes, validated at the boundary.

`ebcd.control.socket` frames lines and knows the peer; `parse` turns a decoded request into one of
these or a `ControlError("bad_request", ...)` naming the field at fault.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ebcd.control.socket import ControlError
from ebcd.model.alert import ALERT_ID_RE


class Op(StrEnum):
    """What a client may ask."""

    SEND = "send"
    CANCEL = "cancel"
    APPROVE = "approve"
    REJECT = "reject"
    STATUS = "status"
    LIST = "list"
    WATCH = "watch"
    REPORT = "report"
    TERMINALS = "terminals"
    RESEND = "resend"
    TOP = "top"  # the whole duty room, streamed (ebcd top)


COMMANDS = frozenset({Op.SEND, Op.CANCEL, Op.APPROVE, Op.REJECT, Op.RESEND})  # journalled, in scope
ON_AN_ALERT = frozenset({Op.CANCEL, Op.APPROVE, Op.REJECT, Op.STATUS, Op.WATCH, Op.REPORT, Op.RESEND})
ResendKind = Literal["uncertain", "failed", "refused"]  # what a resend may pick (ebcd.delivery.core)
RESEND_ONLY: tuple[ResendKind, ...] = ("uncertain", "failed", "refused")


class Request(BaseModel):
    """One request: its op, the alert it is about (`id`), the alert to send (`alert`), or which
    terminals a resend picks (`only`, every kind when not given)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    op: Op
    id: str | None = Field(default=None, max_length=64, pattern=f"^{ALERT_ID_RE.pattern}$")
    alert: dict[str, Any] | None = None  # an AlertRequest as JSON: validated by the send itself
    token: str | None = Field(default=None, max_length=4096)  # an operator's credential, never journalled
    only: list[ResendKind] | None = Field(default=None, min_length=1, max_length=3)

    def detail(self) -> dict[str, Any]:
        """What the audit journal keeps of the request: everything but the op and the token."""
        return self.model_dump(exclude={"op", "token"}, exclude_none=True, mode="json")


def parse(raw: dict[str, Any]) -> Request:
    """A typed request, or ControlError('bad_request') naming what is wrong and where."""
    op = raw.get("op")
    if op not in Op.__members__.values():
        raise ControlError("bad_request", f"unknown op {op!r}")
    try:
        request = Request.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "request"
        raise ControlError("bad_request", f"{where}: {first['msg']}") from None
    if request.op in ON_AN_ALERT and request.id is None:
        raise ControlError("unknown_alert", f"{request.op} needs the alert's id (ebcd alert list shows them)")
    if request.op is Op.SEND and request.alert is None:
        raise ControlError("invalid", "send needs the alert to send")
    return request
