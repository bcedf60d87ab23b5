"""Packages as the platform above builds them, for the EBD tests."""

from __future__ import annotations

import base64
import io
import tarfile
from datetime import datetime

from ebcd.protocols.ebd.documents import Ebm, Header, build, ebm_body
from ebcd.protocols.ebd.signature import ALGORITHM, TrustedKey
from ebcd.security.signing import Ed25519SigningKey, Signer, Sm2SigningKey

CITY = "34152000000000001010101"
DISTRICT = "43415230000000104010101"
EBDID = "10" + CITY + "20261203" + "00000001"


def city_signer(scheme: str = "sm2", seed: int = 7) -> Signer:
    if scheme == "sm2":
        return Signer(Sm2SigningKey.from_scalar(0x1234567 + seed), "000000000001")
    return Signer(Ed25519SigningKey.generate(), "000000000001")


def trusted(signer: Signer) -> list[TrustedKey]:
    return [TrustedKey("city.pem", signer.key.public_key())]


def ebm(**kw: object) -> Ebm:
    values: dict[str, object] = {
        "ebmid": CITY + "202612030001",
        "msg_type": 1,
        "related_ebmid": None,
        "sender_name": "市应急广播平台",
        "sender_code": CITY,
        "event_type": "11B03",
        "severity": 2,
        "start": datetime(2026, 12, 3, 9, 30),
        "end": datetime(2026, 12, 3, 11, 30),
        "language": "zho",
        "title": "暴雨橙色预警",
        "desc": "请注意防范",
        "area_codes": ("341523101000",),
        **kw,
    }
    return Ebm(**values)  # type: ignore[arg-type]


def header(ebdid: str = EBDID, ebd_type: str = "EBM") -> Header:
    return Header(ebdid=ebdid, ebd_type=ebd_type, src=CITY, dest=DISTRICT, time="2026-12-03 09:30:00")


def ebds(signer: Signer, ebdid: str, signed: bytes) -> bytes:
    sig = base64.b64encode(signer.key.sign_raw(signed)).decode()
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<Signature><Version>1</Version><RelatedEBD><EBDID>{ebdid}'
        f"</EBDID></RelatedEBD><CertSN>{signer.serial}</CertSN><SignatureAlgorithm>{ALGORITHM[signer.scheme]}"
        f"</SignatureAlgorithm><SignatureValue>{sig}</SignatureValue></Signature>"
    ).encode()


def raw_tar(entries: list[tarfile.TarInfo | tuple[str, bytes]]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:", format=tarfile.GNU_FORMAT) as tar:
        for entry in entries:
            if isinstance(entry, tarfile.TarInfo):
                tar.addfile(entry)
            else:
                name, data = entry
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def signed_ebm_tar(signer: Signer, ebdid: str = EBDID, **kw: object) -> tuple[bytes, bytes]:
    """(tar, EBDB bytes) of a signed EBM package."""
    doc = build(header(ebdid), ebm_body(ebm(**kw)))
    return raw_tar([(f"EBDB_{ebdid}.xml", doc), (f"EBDS_EBDB_{ebdid}.xml", ebds(signer, ebdid, doc))]), doc
