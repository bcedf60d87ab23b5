"""Who may alert whom: upstream senders and control-socket operators, each confined to an area.

Upstream systems are listed in `[[upstream.senders]]` with the levels, event types and area each
may address, and the certificates it signs with if it signs (XML-DSig, see ingest/xmldsig.py).
Operators are listed in `[[operators]]`: a room (the district, a town or a village) and who speaks
for it: OS users and groups seen on the control socket (SO_PEERCRED), or a token held in a file.

Both come down to a `Scope`: the terminals an actor may address. A refusal is an `IngestError`
with reason `not_allowed` (or `bad_signature`), and the caller journals it with who asked.
"""

from __future__ import annotations

import contextlib
import grp
import hashlib
import hmac
import os
import pwd
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from ebcd.config import Config, OperatorConfig, UpstreamSender
from ebcd.ingest import IngestError, Reason
from ebcd.model.alert import AlertRequest, Origin, parse_target
from ebcd.security.mqtt_auth import read_secret
from ebcd.security.signing import SecurityError
from ebcd.tiers.district import District
from ebcd.tiers.terminal import Terminal

if TYPE_CHECKING:  # lxml, signxml and cryptography's x509: only for senders that sign (signed_by)
    from ebcd.ingest.xmldsig import CapSignatureCheck

log = structlog.get_logger("ebcd.authority")


class AuthorityError(SecurityError):
    """[upstream] or [[operators]] cannot be used as configured (names the entry)."""


@dataclass(frozen=True, slots=True)
class Scope:
    """What one actor may address: a room's area (None: the whole district)."""

    who: str
    room: str | None  # None: the district
    tier: Origin
    terminals: frozenset[str] | None  # None: every terminal

    def outside(self, terminals: Iterable[Terminal | str]) -> list[str]:
        """The given terminals this actor may not address."""
        if self.terminals is None:
            return []
        codes = (t if isinstance(t, str) else t.code for t in terminals)
        return [c for c in codes if c not in self.terminals]

    def check(self, terminals: Iterable[Terminal | str], identifier: str | None, what: str) -> None:
        """Raise not_allowed if any terminal lies outside the scope."""
        outside = self.outside(terminals)
        if outside:
            raise IngestError(
                Reason.NOT_ALLOWED,
                f"{self.who} may {what} only its own area ({self.room}); {len(outside)} terminal(s) "
                f"lie outside it, e.g. {outside[0]}",
                identifier,
            )


DISTRICT_WIDE = Scope("the district duty officer", None, Origin.DISTRICT, None)


def _area(district: District, spec: Sequence[str], where: str) -> frozenset[str] | None:
    """Terminal codes named by `all | town:CODE | village:CODE | terminal:CODE | area:CODE` items."""
    if not spec or "all" in spec:
        return None
    try:
        targets = [parse_target(s) for s in spec]
    except ValueError as e:
        raise AuthorityError(f"{where}: {e}") from None
    resolution = district.resolve(targets)
    if resolution.unknown:
        raise AuthorityError(f"{where}: not in the district: {', '.join(resolution.unknown)}")
    return frozenset(t.code for t in resolution.terminals)


# -- upstream senders ----------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class SenderRule:
    """One listed upstream sender and what it may do."""

    config: UpstreamSender
    scope: Scope
    signature: CapSignatureCheck | None


class UpstreamAuthority:
    """The configured upstream senders; with none listed, every sender may alert the district."""

    def __init__(self, config: Config, district: District) -> None:
        self.rules: dict[str, SenderRule] = {}
        for i, sender in enumerate(config.upstream.senders):
            where = f"[[upstream.senders]] #{i + 1} ({sender.sender})"
            area = _area(district, sender.area, where)
            check = None
            if sender.signed_by:
                from ebcd.ingest.xmldsig import CapSignatureCheck

                paths = [Path(p) if Path(p).is_absolute() else config.base_dir / p for p in sender.signed_by]
                try:
                    check = CapSignatureCheck.from_files(
                        paths,
                        allow_sha1=sender.allow_sha1,
                        whitespace_tolerant=sender.whitespace_tolerant,
                        max_payload_bytes=config.ingest.max_payload_bytes,
                    )
                except ValueError as e:
                    raise AuthorityError(f"{where} signed_by: {e}") from None
                for cert in check.expired:
                    log.warning("upstream.certificate_expired", sender=sender.sender, subject=cert.subject)
            scope = Scope(
                f"upstream sender {sender.sender!r}", ",".join(sender.area) or None, Origin.DISTRICT, area
            )
            self.rules[sender.sender] = SenderRule(sender, scope, check)

    @property
    def open(self) -> bool:
        """No sender is listed: anyone who can publish to the alert topic may alert."""
        return not self.rules

    def vouch(self, sender: str | None, identifier: str | None, payload: bytes, *, is_cap: bool) -> None:
        """Refuse (not_allowed / bad_signature) a sender that is not listed, or whose signature fails."""
        if self.open:
            return
        rule = self.rules.get(sender or "")
        if rule is None:
            raise IngestError(
                Reason.NOT_ALLOWED,
                f"sender {sender!r} is not a listed upstream sender ([[upstream.senders]])"
                if sender
                else "the alert names no sender, and only listed upstream senders may alert",
                identifier,
            )
        if rule.signature is None:
            return
        if not is_cap:
            raise IngestError(
                Reason.BAD_SIGNATURE,
                f"sender {sender!r} signs its alerts (XML-DSig); a JSON alert carries no signature",
                identifier,
            )
        if rule.signature.verify(payload, sender=sender):
            log.info(
                "upstream.signature_whitespace_normalised",
                sender=sender,
                identifier=identifier,
                hint="verified only with whitespace between elements dropped (whitespace_tolerant)",
            )

    def scope(self, request: AlertRequest) -> Scope:
        """What a vouched-for sender may address with this request (not_allowed if not this)."""
        rule = self.rules.get(request.sender or "")
        if rule is None:  # open: any sender, the whole district
            return Scope(f"upstream sender {request.sender!r}", None, Origin.DISTRICT, None)
        self.check_content(rule, request)
        return rule.scope

    def check_content(self, rule: SenderRule, request: AlertRequest) -> None:
        """Level and event type within what the sender may send."""
        cfg = rule.config
        if cfg.levels and request.level not in cfg.levels:
            raise IngestError(
                Reason.NOT_ALLOWED,
                f"sender {cfg.sender!r} may send levels {cfg.levels}, not level {request.level}",
                request.identifier,
            )
        if cfg.event_types and not any(fnmatchcase(request.event_type, p) for p in cfg.event_types):
            raise IngestError(
                Reason.NOT_ALLOWED,
                f"sender {cfg.sender!r} may send event types {cfg.event_types}, not {request.event_type}",
                request.identifier,
            )


# -- operators -----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Operator:
    """A resolved operator entry."""

    config: OperatorConfig
    scope: Scope
    token_digest: bytes | None


class OperatorAuthority:
    """Maps a control-socket peer (or the token it presents) to the room it speaks for."""

    def __init__(self, config: Config, district: District) -> None:
        self.operators: list[Operator] = []
        self.daemon_uid = os.getuid()
        for i, op in enumerate(config.operators):
            where = f"[[operators]] #{i + 1} ({op.room})"
            scope = _room_scope(district, op.room, op.name or op.room, where)
            digest = None
            if op.token_file:
                try:
                    token = read_secret(op.token_file, base=config.base_dir, key=f"{where} token_file")
                except SecurityError as e:  # unreadable, or open to others
                    raise AuthorityError(str(e)) from None
                if not token:
                    raise AuthorityError(f"{where}: token_file {op.token_file} is empty")
                digest = hashlib.sha256(token.encode()).digest()
            self.operators.append(Operator(op, scope, digest))

    @property
    def open(self) -> bool:
        """No operator is listed: whoever may open the socket acts for the district."""
        return not self.operators

    def scope_of(self, *, uid: int, gid: int, user: str, token: str | None) -> Scope:
        """The scope of a peer; IngestError(not_allowed) for an unknown token or an unlisted user."""
        if token is not None:
            digest = hashlib.sha256(token.encode()).digest()
            for op in self.operators:
                if op.token_digest is not None and hmac.compare_digest(op.token_digest, digest):
                    return op.scope
            raise IngestError(
                Reason.NOT_ALLOWED, f"{user}: the operator token matches no [[operators]] entry"
            )
        groups = _groups(uid, gid)
        for op in self.operators:
            if user in op.config.users or groups.intersection(op.config.groups):
                return op.scope
        if self.open or uid in (0, self.daemon_uid):  # root and the daemon's own account
            return DISTRICT_WIDE
        raise IngestError(
            Reason.NOT_ALLOWED, f"user {user} is not a listed operator ([[operators]]) and may only read"
        )


def _room_scope(district: District, room: str, name: str, where: str) -> Scope:
    if room == district.code:
        return Scope(f"operator {name} (district)", None, Origin.DISTRICT, None)
    town = district.town(room)
    if town is not None:
        terms = frozenset(t.code for t in town.terminals())
        return Scope(f"operator {name} (town {town.name})", room, Origin.TOWN, terms)
    village = district.village(room)
    if village is not None:
        terms = frozenset(t.code for t in village.terminals)
        return Scope(f"operator {name} (village {village.name})", room, Origin.VILLAGE, terms)
    raise AuthorityError(f"{where}: room {room} is neither the district nor one of its towns or villages")


def _groups(uid: int, gid: int) -> set[str]:
    """The names of the peer's primary and supplementary groups."""
    names: set[str] = set()
    gids = {gid}
    with contextlib.suppress(KeyError, OSError):
        gids.update(os.getgrouplist(pwd.getpwuid(uid).pw_name, gid))
    for g in gids:
        try:
            names.add(grp.getgrgid(g).gr_name)
        except KeyError:
            names.add(str(g))
    return names


def as_room(request: AlertRequest, scope: Scope) -> AlertRequest:
    """A room operator's alert speaks for its room (its tier in the priority order)."""
    if scope.room is None or scope.tier is Origin.DISTRICT:
        return request
    if request.origin is not Origin.DISTRICT and request.origin_room != scope.room:
        raise IngestError(
            Reason.NOT_ALLOWED,
            f"{scope.who} may speak for its own room {scope.room} only, not {request.origin_room}",
            request.identifier,
        )
    return request.model_copy(update={"origin": scope.tier, "origin_room": scope.room})
