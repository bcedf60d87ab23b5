"""EBD packages between platforms (FIELD-PROTOCOLS.md section 3): a pure codec, no I/O, no asyncio.

A package is a tar `EBDT_<EBDID>.tar` holding the document `EBDB_<EBDID>.xml`, its detached
signature `EBDS_EBDB_<EBDID>.xml` and any `EBDR_*` resources the document names, POSTed as the
file part of `multipart/form-data`. `package` unpacks and packs the tar (in memory, refusing
anything unsafe before reading a byte of content), `signature` signs and verifies the EBDS over
the exact EBDB bytes, `documents` reads and writes the XML documents.

Every refusal is an `EbdError` carrying the EBDResponse `ResultCode` the sender is answered with
and the `Reason` it is counted under, and a detail that says what and where.
"""

from __future__ import annotations

from enum import IntEnum

from ebcd.ingest import Reason


class ResultCode(IntEnum):
    """EBDResponse ResultCode (GS `EBD_EBDResponse.java`)."""

    UNPROCESSED = 0
    OK = 1
    PARSE_FAILURE = 2
    MISSING_CONTENT = 3
    SIGNATURE_FAILURE = 4
    OTHER = 5


class EbdError(Exception):
    """A package or document refused: the ResultCode to answer, the metric's reason, what and where."""

    def __init__(self, code: ResultCode, reason: Reason, detail: str, ebdid: str | None = None) -> None:
        super().__init__(f"{code.name} ({reason.value}): {detail}")
        self.code = code
        self.reason = reason
        self.detail = detail
        self.ebdid = ebdid
