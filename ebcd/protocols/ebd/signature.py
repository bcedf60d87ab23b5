"""The EBDS file: a detached signature over the exact bytes of the EBDB file.

    <Signature><Version>1</Version><RelatedEBD><EBDID>…</EBDID></RelatedEBD>
      <CertSN>12 digits</CertSN><SignatureAlgorithm>SM2-SM3</SignatureAlgorithm>
      <SignatureValue>base64 of r‖s (64 bytes)</SignatureValue></Signature>

SM2 with SM3 and the default user id 1234567812345678 (`ebcd.security.signing`), or Ed25519 when
`SignatureAlgorithm` says `Ed25519`. The platform above's keys come as PEM SubjectPublicKeyInfo,
the form Tongsuo and GmSSL write for SM2 (id-ecPublicKey or the SM2 OID as algorithm, the SM2
curve OID as parameter); Ed25519 keys in the same PEM form. A PEM carries no certificate serial, so
every trusted key is tried; `CertSN` is reported, not trusted.
"""

from __future__ import annotations

import base64
import binascii
import xml.etree.ElementTree as ET  # builds our own documents; parsing is defused
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from ebcd.ingest import IngestError, Reason
from ebcd.ingest.cap_xml import parse_xml
from ebcd.protocols.ebd import EbdError, ResultCode
from ebcd.protocols.ebd.documents import child_text, xml_bytes
from ebcd.security.signing import (
    Ed25519VerifyingKey,
    SecurityError,
    Signer,
    Sm2VerifyingKey,
    VerifyingKey,
)

ALGORITHM = {"sm2": "SM2-SM3", "ed25519": "Ed25519"}
_OID_EC_PUBLIC_KEY = bytes.fromhex("2a8648ce3d0201")  # 1.2.840.10045.2.1
_OID_SM2 = bytes.fromhex("2a811ccf5501822d")  # 1.2.156.10197.1.301
MAX_PEM_BYTES = 64 * 1024


class EbdKeyError(SecurityError, ValueError):
    """A PEM file that holds no usable public key; names the file ([ebd] verify_with stops the start)."""


@dataclass(frozen=True, slots=True)
class TrustedKey:
    """A public key of the platform above and the file it came from."""

    name: str
    key: VerifyingKey


def sign_ebds(signer: Signer, ebdid: str, ebdb: bytes) -> bytes:
    """The EBDS document signing `ebdb` with ebcd's key."""
    sig = ET.Element("Signature")
    ET.SubElement(sig, "Version").text = "1"
    ET.SubElement(ET.SubElement(sig, "RelatedEBD"), "EBDID").text = ebdid
    ET.SubElement(sig, "CertSN").text = signer.serial
    ET.SubElement(sig, "SignatureAlgorithm").text = ALGORITHM[signer.scheme]
    ET.SubElement(sig, "SignatureValue").text = base64.b64encode(signer.key.sign_raw(ebdb)).decode()
    return xml_bytes(sig)


def _sig_error(detail: str, ebdid: str | None) -> EbdError:
    return EbdError(ResultCode.SIGNATURE_FAILURE, Reason.BAD_SIGNATURE, detail, ebdid)


def verify_ebds(ebds: bytes | None, ebdb: bytes, ebdid: str, keys: Sequence[TrustedKey]) -> TrustedKey:
    """The trusted key whose signature the EBDS carries over `ebdb`, or EbdError(4) saying why not."""
    if ebds is None:
        raise EbdError(
            ResultCode.MISSING_CONTENT, Reason.MISSING_CONTENT, f"no EBDS_EBDB_{ebdid}.xml (signature)", ebdid
        )
    try:
        doc = parse_xml(ebds)
    except IngestError as e:
        raise _sig_error(f"EBDS_EBDB_{ebdid}.xml: {e.detail}", ebdid) from None
    root = doc.root
    if root.name != "Signature":
        raise _sig_error(f"EBDS_EBDB_{ebdid}.xml: root <{root.name}>, expected <Signature>", ebdid)
    related = child_text(root, "RelatedEBD", "EBDID")
    if related is not None and related != ebdid:
        raise _sig_error(f"EBDS RelatedEBD/EBDID {related} is not the document's EBDID {ebdid}", ebdid)
    algorithm = (child_text(root, "SignatureAlgorithm") or "SM2-SM3").strip()
    scheme = {"SM2-SM3": "sm2", "SM2": "sm2", "SM3withSM2": "sm2", "Ed25519": "ed25519"}.get(algorithm)
    if scheme is None:
        raise _sig_error(f"EBDS SignatureAlgorithm {algorithm[:40]!r} is not SM2-SM3 or Ed25519", ebdid)
    value = child_text(root, "SignatureValue") or ""
    try:
        raw = base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError):
        raise _sig_error("EBDS SignatureValue is not base64", ebdid) from None
    if len(raw) != 64:
        raise _sig_error(f"EBDS SignatureValue is {len(raw)} bytes, expected 64 (r‖s)", ebdid)
    candidates = [k for k in keys if k.key.scheme == scheme]
    for k in candidates:
        if k.key.verify_raw(ebdb, raw):
            return k
    cert = child_text(root, "CertSN") or "?"
    tried = ", ".join(k.name for k in candidates) or f"none (no {scheme} key in verify_with)"
    raise _sig_error(
        f"the {algorithm} signature (CertSN {cert[:20]}) over EBDB_{ebdid}.xml verifies with no trusted key; "
        f"tried {tried}",
        ebdid,
    )


# -- PEM public keys ---------------------------------------------------------------------


def load_public_keys(paths: Sequence[Path]) -> list[TrustedKey]:
    """Every public key in the PEM files; EbdKeyError naming a file that holds none."""
    keys: list[TrustedKey] = []
    for path in paths:
        try:
            text = path.read_bytes()[:MAX_PEM_BYTES]
        except OSError as e:
            raise EbdKeyError(f"{path}: cannot read: {e.strerror}") from None
        keys.append(TrustedKey(str(path), public_key_from_pem(text, str(path))))
    return keys


def public_key_from_pem(pem: bytes, where: str = "PEM") -> VerifyingKey:
    """An SM2 or Ed25519 public key from PEM SubjectPublicKeyInfo."""
    try:
        loaded = serialization.load_pem_public_key(pem)
    except UnsupportedAlgorithm:
        loaded = None  # an SM2 curve the OpenSSL beneath cryptography does not know: read it ourselves
    except ValueError as e:
        raise EbdKeyError(f"{where}: not a PEM public key ({e})") from None
    if isinstance(loaded, ed25519.Ed25519PublicKey):
        return Ed25519VerifyingKey(loaded)
    der = _pem_der(pem, where)
    point = _sm2_point(der, where)
    try:
        return Sm2VerifyingKey(point)
    except ValueError as e:
        raise EbdKeyError(f"{where}: {e}") from None


def sm2_public_pem(key: Sm2VerifyingKey) -> bytes:
    """The SubjectPublicKeyInfo PEM of an SM2 key, as Tongsuo writes it."""
    algo = _tlv(0x30, _tlv(0x06, _OID_EC_PUBLIC_KEY) + _tlv(0x06, _OID_SM2))
    spki = _tlv(0x30, algo + _tlv(0x03, b"\x00\x04" + key.xy))
    b64 = base64.encodebytes(spki).decode().replace("\n", "")
    lines = [b64[i : i + 64] for i in range(0, len(b64), 64)]
    return ("-----BEGIN PUBLIC KEY-----\n" + "\n".join(lines) + "\n-----END PUBLIC KEY-----\n").encode()


def public_pem(key: VerifyingKey) -> bytes:
    """The SubjectPublicKeyInfo PEM of an SM2 or Ed25519 public key."""
    if isinstance(key, Sm2VerifyingKey):
        return sm2_public_pem(key)
    if isinstance(key, Ed25519VerifyingKey):
        return key.key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    raise TypeError(f"no PEM form for {type(key).__name__}")


def _pem_der(pem: bytes, where: str) -> bytes:
    text = pem.decode("ascii", "replace")
    begin, end = "-----BEGIN PUBLIC KEY-----", "-----END PUBLIC KEY-----"
    if begin not in text or end not in text:
        raise EbdKeyError(f"{where}: no '{begin}' block (SubjectPublicKeyInfo)")
    body = text.split(begin, 1)[1].split(end, 1)[0]
    try:
        return base64.b64decode("".join(body.split()), validate=True)
    except (binascii.Error, ValueError):
        raise EbdKeyError(f"{where}: the PEM block is not base64") from None


def _tlv(tag: int, value: bytes) -> bytes:
    n = len(value)
    if n < 0x80:
        return bytes([tag, n]) + value
    width = (n.bit_length() + 7) // 8
    length = bytes([0x80 | width]) + n.to_bytes(width)
    return bytes([tag]) + length + value


def _read_tlv(data: bytes, pos: int, tag: int, where: str) -> tuple[bytes, int]:
    if pos + 2 > len(data) or data[pos] != tag:
        raise EbdKeyError(f"{where}: not a SubjectPublicKeyInfo (expected DER tag {tag:#04x} at byte {pos})")
    n, pos = data[pos + 1], pos + 2
    if n & 0x80:
        width = n & 0x7F
        if width == 0 or width > 2 or pos + width > len(data):
            raise EbdKeyError(f"{where}: bad DER length at byte {pos}")
        n, pos = int.from_bytes(data[pos : pos + width]), pos + width
    if pos + n > len(data):
        raise EbdKeyError(f"{where}: DER value at byte {pos} runs past the end")
    return data[pos : pos + n], pos + n


def _sm2_point(der: bytes, where: str) -> bytes:
    spki, _ = _read_tlv(der, 0, 0x30, where)
    algo, pos = _read_tlv(spki, 0, 0x30, where)
    bits, _ = _read_tlv(spki, pos, 0x03, where)
    oid, apos = _read_tlv(algo, 0, 0x06, where)
    params = _read_tlv(algo, apos, 0x06, where)[0] if apos < len(algo) else b""
    if not (oid == _OID_SM2 or (oid == _OID_EC_PUBLIC_KEY and params == _OID_SM2)):
        raise EbdKeyError(f"{where}: neither an SM2 nor an Ed25519 public key")
    if len(bits) != 66 or bits[:2] != b"\x00\x04":
        raise EbdKeyError(f"{where}: the SM2 point is not an uncompressed 04‖x‖y")
    return bits[2:]
