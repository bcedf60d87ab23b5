"""A package in and a package out: unpack, verify, parse; build, sign, pack."""

from __future__ import annotations

import xml.etree.ElementTree as ET  # builds our own documents; parsing is defused
from collections.abc import Sequence
from dataclasses import dataclass

from ebcd.ingest import Reason
from ebcd.protocols.ebd import EbdError, ResultCode
from ebcd.protocols.ebd.documents import Document, Header, build, parse_document
from ebcd.protocols.ebd.package import DEFAULT_MAX_BYTES, DEFAULT_MAX_FILES, Package, pack, unpack
from ebcd.protocols.ebd.signature import TrustedKey, sign_ebds, verify_ebds
from ebcd.security.signing import Signer

# GS does not verify the signature of a heartbeat (FIELD-PROTOCOLS.md §3); ebcd does, unless told
UNSIGNED_TYPES_ALLOWED: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Received:
    """A package that unpacked, verified and parsed: what the judge works from."""

    package: Package
    document: Document
    signed_by: str | None


def open_package(
    tar: bytes,
    keys: Sequence[TrustedKey],
    *,
    max_files: int = DEFAULT_MAX_FILES,
    max_bytes: int = DEFAULT_MAX_BYTES,
    unsigned_types: frozenset[str] = UNSIGNED_TYPES_ALLOWED,
) -> Received:
    """Unpack (safely), parse the envelope, verify the EBDS over the exact EBDB bytes; EbdError if not."""
    package = unpack(tar, max_files=max_files, max_bytes=max_bytes)
    document = parse_document(package.ebdb, package.ebdb_name)
    ebdid = document.header.ebdid
    if package.ebdid_of_name != ebdid:
        raise EbdError(
            ResultCode.PARSE_FAILURE,
            Reason.SCHEMA,
            f"{package.ebdb_name} holds EBDID {ebdid}: the file name and the document disagree",
            ebdid,
        )
    signed_by = None
    if package.ebds is not None or document.header.ebd_type not in unsigned_types:
        signed_by = verify_ebds(package.ebds, package.ebdb, ebdid, keys).name
    return Received(package, document, signed_by)


def seal(
    signer: Signer | None, header: Header, body: ET.Element, resources: dict[str, bytes] | None = None
) -> bytes:
    """The tar of a document built from `header` and `body`, signed with `signer` (None: unsigned)."""
    ebdb = build(header, body)
    ebds = sign_ebds(signer, header.ebdid, ebdb) if signer is not None else None
    return pack(header.ebdid, ebdb, ebds, resources)
