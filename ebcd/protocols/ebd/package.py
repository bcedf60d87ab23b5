"""The EBD tar, unpacked and packed in memory; the tar part of a multipart/form-data body.

Unpacking reads the tar headers first, all of them, and refuses the package before any content is
read if one entry is not a plain file at the root (a `../` or absolute path, a directory, a link, a
device, a FIFO), if a name repeats, is not one of `EBDB_*.xml`, `EBDS_EBDB_*.xml`, `EBDR_*`, or if
there are more entries or more bytes than allowed. Contents stay in memory, keyed by name: no file
of a package is ever written to disk, by its own name or any other.
"""

from __future__ import annotations

import io
import re
import tarfile
from dataclasses import dataclass, field
from email.message import Message
from email.parser import BytesParser
from email.policy import HTTP

from ebcd.ingest import Reason
from ebcd.protocols.ebd import EbdError, ResultCode

DEFAULT_MAX_FILES = 32
DEFAULT_MAX_BYTES = 16 * 1024 * 1024  # an EBDR audio file of a few minutes fits
MAX_NAME_CHARS = 128
_NAME = re.compile(r"^(EBDB_[0-9A-Za-z]+\.xml|EBDS_EBDB_[0-9A-Za-z]+\.xml|EBDR_[0-9A-Za-z_.-]+)$")
_TAR_BLOCK = 512


@dataclass(frozen=True, slots=True)
class Package:
    """One unpacked EBD package: the document bytes, its signature bytes, its resources by name."""

    ebdb_name: str
    ebdb: bytes
    ebds: bytes | None
    resources: dict[str, bytes] = field(default_factory=dict)

    @property
    def ebdid_of_name(self) -> str:
        """The EBDID the document's file name carries."""
        return self.ebdb_name.removeprefix("EBDB_").removesuffix(".xml")


def _bad(detail: str) -> EbdError:
    return EbdError(ResultCode.PARSE_FAILURE, Reason.BAD_PACKAGE, detail)


def unpack(data: bytes, *, max_files: int = DEFAULT_MAX_FILES, max_bytes: int = DEFAULT_MAX_BYTES) -> Package:
    """The package in a tar, or EbdError saying which entry is refused and why."""
    if len(data) > max_bytes + 64 * _TAR_BLOCK:
        raise EbdError(
            ResultCode.OTHER, Reason.TOO_LARGE, f"tar of {len(data)} bytes exceeds {max_bytes} bytes"
        )
    try:
        tar = tarfile.open(fileobj=io.BytesIO(data), mode="r:")  # noqa: SIM115 -- closed below
    except tarfile.TarError as e:
        raise _bad(f"not a tar archive: {e}") from None
    with tar:
        members: list[tarfile.TarInfo] = []
        names: set[str] = set()
        total = 0
        try:
            while (member := tar.next()) is not None:
                where = f"tar entry {len(members) + 1} ({member.name[:MAX_NAME_CHARS]!r})"
                if len(members) >= max_files:
                    raise EbdError(
                        ResultCode.OTHER, Reason.TOO_LARGE, f"more than {max_files} files in the package"
                    )
                _check_member(member, where)
                if member.name in names:
                    raise _bad(f"{where}: the name appears twice")
                total += member.size
                if total > max_bytes:
                    raise EbdError(
                        ResultCode.OTHER,
                        Reason.TOO_LARGE,
                        f"{where}: the files add up to more than {max_bytes} bytes",
                    )
                names.add(member.name)
                members.append(member)
        except tarfile.TarError as e:
            raise _bad(f"tar entry {len(members) + 1}: {e}") from None
        # every header was fine: only now is any content read (into memory)
        contents: dict[str, bytes] = {}
        for member in members:
            f = tar.extractfile(member)
            if f is None:  # cannot happen for a regular file; refuse rather than guess
                raise _bad(f"tar entry {member.name!r}: no content")
            contents[member.name] = f.read()
    return _assemble(contents)


def _check_member(member: tarfile.TarInfo, where: str) -> None:
    name = member.name
    if name.startswith("/") or "\\" in name or ".." in name.split("/"):
        raise _bad(f"{where}: a path outside the package root")
    if member.issym() or member.islnk():
        raise _bad(f"{where}: a link (to {member.linkname[:MAX_NAME_CHARS]!r})")
    if member.isdev() or member.isfifo():
        raise _bad(f"{where}: a device or FIFO")
    if not member.isreg():
        raise _bad(f"{where}: not a regular file (type {member.type!r})")
    if "/" in name or len(name) > MAX_NAME_CHARS or not _NAME.match(name):
        raise _bad(f"{where}: not a file name of an EBD package (EBDB_*.xml, EBDS_EBDB_*.xml, EBDR_*)")


def _assemble(contents: dict[str, bytes]) -> Package:
    ebdbs = [n for n in contents if n.startswith("EBDB_")]
    if not ebdbs:
        names = ", ".join(sorted(contents)) or "nothing"
        detail = f"no EBDB_*.xml in the package (it holds {names})"
        raise EbdError(ResultCode.MISSING_CONTENT, Reason.MISSING_CONTENT, detail)
    if len(ebdbs) > 1:
        raise _bad(f"{len(ebdbs)} documents in one package: {', '.join(sorted(ebdbs))}")
    ebdb = ebdbs[0]
    sig_name = f"EBDS_{ebdb}"
    others = [n for n in contents if n.startswith("EBDS_") and n != sig_name]
    if others:
        raise _bad(f"signature {others[0]} does not belong to {ebdb}")
    resources = {n: contents[n] for n in contents if n.startswith("EBDR_")}
    return Package(ebdb, contents[ebdb], contents.get(sig_name), resources)


def pack(ebdid: str, ebdb: bytes, ebds: bytes | None, resources: dict[str, bytes] | None = None) -> bytes:
    """The tar `EBDT_<ebdid>.tar` of a document, its signature and resources (deterministic)."""
    out = io.BytesIO()
    files = [(f"EBDB_{ebdid}.xml", ebdb)]
    if ebds is not None:
        files.append((f"EBDS_EBDB_{ebdid}.xml", ebds))
    files.extend(sorted((resources or {}).items()))
    with tarfile.open(fileobj=out, mode="w:", format=tarfile.USTAR_FORMAT) as tar:
        for name, content in files:
            info = tarfile.TarInfo(name)
            info.size = len(content)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(content))
    return out.getvalue()


def tar_name(ebdid: str) -> str:
    """The file name a package travels under."""
    return f"EBDT_{ebdid}.tar"


# -- multipart/form-data ---------------------------------------------------------------------


def tar_of_body(body: bytes, content_type: str) -> bytes:
    """The tar a POST carries: the tar file part of multipart/form-data, or a bare tar body."""
    ctype = content_type.split(";", 1)[0].strip().lower()
    if ctype in ("application/x-tar", "application/tar", "application/octet-stream"):
        return body
    if ctype != "multipart/form-data":
        raise _bad(f"Content-Type {content_type[:100]!r}: expected multipart/form-data with a tar part")
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode()
    msg = BytesParser(policy=HTTP).parsebytes(head + body)
    if not msg.is_multipart():
        raise _bad("multipart/form-data body without parts (is the boundary right?)")
    parts: list[Message] = list(msg.iter_parts())
    tars = [p for p in parts if _is_tar_part(p)]
    if not tars:
        described = ", ".join(f"{p.get_content_type()} {p.get_filename()!r}" for p in parts) or "none"
        raise EbdError(
            ResultCode.MISSING_CONTENT,
            Reason.MISSING_CONTENT,
            f"no application/x-tar part (or *.tar file) in the form; parts: {described[:300]}",
        )
    if len(tars) > 1:
        raise _bad(f"{len(tars)} tar parts in one request; send one package per request")
    payload = tars[0].get_payload(decode=True)
    if not isinstance(payload, bytes):
        raise _bad("the tar part has no content")
    return payload


def _is_tar_part(part: Message) -> bool:
    name = part.get_filename() or ""
    return part.get_content_type() in ("application/x-tar", "application/tar") or name.endswith(".tar")


def multipart(tar: bytes, filename: str, boundary: str) -> tuple[bytes, str]:
    """A multipart/form-data body carrying one tar file part, and its Content-Type."""
    head = (
        f"--{boundary}\r\n"
        f'Content-Disposition: form-data; name="file"; filename="{filename}"\r\n'
        "Content-Type: application/x-tar\r\n\r\n"
    ).encode()
    body = head + tar + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"
