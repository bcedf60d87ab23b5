"""The EBD codec: packages in and out, and hostile packages refused with their ResultCode."""

from __future__ import annotations

import base64
import os
import tarfile

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ebcd.ingest import Reason
from ebcd.protocols.ebd import EbdError, ResultCode
from ebcd.protocols.ebd.documents import Header, parse_ebm, response_body
from ebcd.protocols.ebd.envelope import open_package, seal
from ebcd.protocols.ebd.package import multipart, pack, tar_of_body, unpack
from ebcd.protocols.ebd.signature import public_key_from_pem, public_pem, sm2_public_pem
from ebcd.security.signing import Sm2SigningKey
from tests.protocols.ebd_fixtures import (
    EBDID,
    city_signer,
    ebds,
    header,
    raw_tar,
    signed_ebm_tar,
    trusted,
)


def refused(tar: bytes, keys: list, **kw: object) -> EbdError:  # type: ignore[type-arg]
    with pytest.raises(EbdError) as info:
        open_package(tar, keys, **kw)  # type: ignore[arg-type]
    assert info.value.detail  # says what and where
    return info.value


@pytest.mark.parametrize("scheme", ["sm2", "ed25519"])
def test_a_signed_ebm_opens_and_reads_back(scheme: str) -> None:
    city = city_signer(scheme)
    tar, _ = signed_ebm_tar(city, area_codes=("341523101000", "341523102000"))
    got = open_package(tar, trusted(city))
    assert got.signed_by == "city.pem"
    assert got.document.header.ebdid == EBDID
    assert got.document.header.ebd_type == "EBM"
    ebm = parse_ebm(got.document.body, EBDID)
    assert (ebm.msg_type, ebm.severity, ebm.event_type) == (1, 2, "11B03")
    assert ebm.area_codes == ("341523101000", "341523102000")
    assert (ebm.title, ebm.desc) == ("暴雨橙色预警", "请注意防范")
    assert ebm.start is not None
    assert ebm.start.hour == 9


def test_ebcd_seals_what_it_opens() -> None:
    ours = city_signer("sm2", seed=99)
    tar = seal(ours, header(ebd_type="EBDResponse"), response_body(ResultCode.OK, "ok"))
    got = open_package(tar, trusted(ours))
    assert got.document.body is not None
    assert [c.name for c in got.document.body.children] == ["ResultCode", "ResultDesc"]


def test_bad_signature_is_refused_with_code_4() -> None:
    city = city_signer()
    _tar, doc = signed_ebm_tar(city)
    sig = ebds(city, EBDID, doc).replace(b"<SignatureValue>", b"<SignatureValue>AAAA")
    bad = raw_tar([(f"EBDB_{EBDID}.xml", doc), (f"EBDS_EBDB_{EBDID}.xml", sig)])
    err = refused(bad, trusted(city))
    assert err.code is ResultCode.SIGNATURE_FAILURE


def test_signature_of_another_key_is_refused_with_code_4() -> None:
    tar, _ = signed_ebm_tar(city_signer(seed=1))
    err = refused(tar, trusted(city_signer(seed=2)))
    assert (err.code, err.reason) == (ResultCode.SIGNATURE_FAILURE, Reason.BAD_SIGNATURE)
    assert "city.pem" in err.detail


def test_ebdb_changed_after_signing_is_refused_with_code_4() -> None:
    city = city_signer()
    _, doc = signed_ebm_tar(city)
    sig = ebds(city, EBDID, doc)
    changed = doc.replace(b"341523101000", b"341523102000")
    err = refused(raw_tar([(f"EBDB_{EBDID}.xml", changed), (f"EBDS_EBDB_{EBDID}.xml", sig)]), trusted(city))
    assert err.code is ResultCode.SIGNATURE_FAILURE


def test_missing_signature_is_refused_with_code_3() -> None:
    city = city_signer()
    _, doc = signed_ebm_tar(city)
    err = refused(raw_tar([(f"EBDB_{EBDID}.xml", doc)]), trusted(city))
    assert (err.code, err.reason) == (ResultCode.MISSING_CONTENT, Reason.MISSING_CONTENT)


def test_missing_ebdb_is_refused_with_code_3() -> None:
    city = city_signer()
    _, doc = signed_ebm_tar(city)
    err = refused(raw_tar([(f"EBDS_EBDB_{EBDID}.xml", ebds(city, EBDID, doc))]), trusted(city))
    assert err.code is ResultCode.MISSING_CONTENT
    assert "no EBDB" in err.detail


@pytest.mark.parametrize("name", ["../EBDB_1.xml", "/etc/EBDB_1.xml", "a/../../EBDB_1.xml", "x/EBDB_1.xml"])
def test_paths_outside_the_root_are_refused_before_any_content(name: str) -> None:
    err = refused(raw_tar([(name, b"<EBD/>")]), trusted(city_signer()))
    assert (err.code, err.reason) == (ResultCode.PARSE_FAILURE, Reason.BAD_PACKAGE)
    assert "tar entry 1" in err.detail


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE, tarfile.FIFOTYPE])
def test_links_and_devices_are_refused(kind: bytes) -> None:
    city = city_signer()
    _tar, doc = signed_ebm_tar(city)
    link = tarfile.TarInfo(f"EBDR_{EBDID}.mp3")
    link.type = kind
    link.linkname = "/etc/passwd"
    bad = raw_tar([(f"EBDB_{EBDID}.xml", doc), link])
    err = refused(bad, trusted(city))
    assert (err.code, err.reason) == (ResultCode.PARSE_FAILURE, Reason.BAD_PACKAGE)
    assert "tar entry 2" in err.detail


def test_duplicate_names_are_refused() -> None:
    city = city_signer()
    _, doc = signed_ebm_tar(city)
    sig = ebds(city, EBDID, doc)
    err = refused(
        raw_tar([(f"EBDB_{EBDID}.xml", doc), (f"EBDS_EBDB_{EBDID}.xml", sig), (f"EBDB_{EBDID}.xml", b"x")]),
        trusted(city),
    )
    assert "twice" in err.detail


def test_ten_thousand_files_are_refused_at_the_limit() -> None:
    many = raw_tar([(f"EBDR_{n}.bin", b"") for n in range(10_000)])
    err = refused(many, trusted(city_signer()), max_files=32)
    assert (err.code, err.reason) == (ResultCode.OTHER, Reason.TOO_LARGE)
    assert "more than 32 files" in err.detail


def test_fifty_megabytes_are_refused() -> None:
    big = raw_tar([(f"EBDR_{EBDID}.mp3", bytes(50 * 1024 * 1024))])
    err = refused(big, trusted(city_signer()), max_bytes=16 * 1024 * 1024)
    assert (err.code, err.reason) == (ResultCode.OTHER, Reason.TOO_LARGE)


def test_a_file_larger_than_the_limit_inside_a_small_claim_is_refused_by_its_header() -> None:
    city = city_signer()
    _, doc = signed_ebm_tar(city)
    tar = raw_tar([(f"EBDB_{EBDID}.xml", doc), (f"EBDR_{EBDID}.mp3", bytes(2048))])
    err = refused(tar, trusted(city), max_bytes=1024)
    assert "more than 1024 bytes" in err.detail


def test_entity_bomb_is_refused_with_code_2() -> None:
    city = city_signer()
    bomb = (
        b'<?xml version="1.0"?><!DOCTYPE EBD [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;">'
        b'<!ENTITY c "&b;&b;&b;&b;&b;&b;&b;">]><EBD><EBDID>&c;</EBDID></EBD>'
    )
    tar = raw_tar([(f"EBDB_{EBDID}.xml", bomb), (f"EBDS_EBDB_{EBDID}.xml", ebds(city, EBDID, bomb))])
    err = refused(tar, trusted(city))
    assert (err.code, err.reason) == (ResultCode.PARSE_FAILURE, Reason.FORBIDDEN_XML)


def test_not_a_tar_is_a_parse_failure() -> None:
    err = refused(b"this is not a tar" * 100, trusted(city_signer()))
    assert err.code is ResultCode.PARSE_FAILURE


def test_file_name_and_ebdid_must_agree() -> None:
    city = city_signer()
    _, doc = signed_ebm_tar(city)
    other = EBDID[:-1] + "9"
    err = refused(raw_tar([(f"EBDB_{other}.xml", doc), (f"EBDS_EBDB_{other}.xml", ebds(city, other, doc))]),
                  trusted(city))  # fmt: skip
    assert "disagree" in err.detail


def test_a_cancel_must_name_what_it_cancels() -> None:
    city = city_signer()
    tar, _ = signed_ebm_tar(city, msg_type=2)
    got = open_package(tar, trusted(city))
    with pytest.raises(EbdError) as info:
        parse_ebm(got.document.body, EBDID)
    assert info.value.code is ResultCode.MISSING_CONTENT
    assert "RelatedInfo" in info.value.detail


@pytest.mark.parametrize("area", ["34152310100", "3415231010001", "abcdefghijkl"])
def test_area_codes_must_be_twelve_digits(area: str) -> None:
    city = city_signer()
    tar, _ = signed_ebm_tar(city, area_codes=(area,))
    got = open_package(tar, trusted(city))
    with pytest.raises(EbdError, match="12-digit"):
        parse_ebm(got.document.body, EBDID)


def test_multipart_round_trip_keeps_binary_bytes() -> None:
    tar = pack(EBDID, b"<EBD/>", None, {"EBDR_a.mp3": os.urandom(70_000) + b"\r\n--x\r\n"})
    body, ctype = multipart(tar, f"EBDT_{EBDID}.tar", "ebcdboundary1234")
    assert tar_of_body(body, ctype) == tar
    assert unpack(tar).resources["EBDR_a.mp3"].endswith(b"\r\n--x\r\n")


def test_multipart_without_a_tar_part_is_missing_content() -> None:
    body = b'--b\r\nContent-Disposition: form-data; name="x"\r\n\r\nhello\r\n--b--\r\n'
    with pytest.raises(EbdError) as info:
        tar_of_body(body, "multipart/form-data; boundary=b")
    assert info.value.code is ResultCode.MISSING_CONTENT


def test_sm2_pem_of_tongsuo_reads_and_its_signature_verifies() -> None:
    """Tongsuo writes the platform above's key and signs its EBDB; ebcd reads and verifies both."""
    ec = pytest.importorskip("tongsuopy.crypto.asymciphers.ec")
    hashes = pytest.importorskip("tongsuopy.crypto.hashes")
    serialization = pytest.importorskip("tongsuopy.crypto.serialization")
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

    private = ec.generate_private_key(ec.SM2())
    pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    key = public_key_from_pem(pem, "tongsuo.pem")
    ebdb = b'<?xml version="1.0"?><EBD><EBDID>' + EBDID.encode() + b"</EBDID></EBD>"
    r, s = decode_dss_signature(private.sign(ebdb, ec.ECDSA(hashes.SM3())))
    assert key.verify_raw(ebdb, r.to_bytes(32) + s.to_bytes(32))
    assert not key.verify_raw(ebdb + b" ", r.to_bytes(32) + s.to_bytes(32))
    # and the PEM ebcd writes for its own SM2 key is the one Tongsuo reads
    ours = Sm2SigningKey.generate()
    theirs = serialization.load_pem_public_key(sm2_public_pem(ours.public))
    numbers = theirs.public_numbers()
    assert numbers.x.to_bytes(32) + numbers.y.to_bytes(32) == ours.public.xy
    sig = ours.sign_raw(ebdb)
    from tongsuopy.crypto.asymciphers.utils import encode_dss_signature

    theirs.verify(encode_dss_signature(int.from_bytes(sig[:32]), int.from_bytes(sig[32:])), ebdb,
                  ec.ECDSA(hashes.SM3()))  # fmt: skip


def test_ed25519_pem_round_trip_and_garbage_pem_is_named() -> None:
    signer = city_signer("ed25519")
    key = public_key_from_pem(public_pem(signer.key.public_key()))
    assert key.verify_raw(b"m", signer.key.sign_raw(b"m"))
    with pytest.raises(ValueError, match=r"bad\.pem"):
        public_key_from_pem(b"-----BEGIN PUBLIC KEY-----\n" + base64.b64encode(b"\x30\x03abc") +
                            b"\n-----END PUBLIC KEY-----\n", "bad.pem")  # fmt: skip


def test_header_fields_survive_a_round_trip() -> None:
    h = Header(ebdid=EBDID, ebd_type="ConnectionCheck", src="1" * 23, dest="2" * 23,
               time="2026-12-03 10:00:00", src_url="http://x/ebd", related="3" * 41)  # fmt: skip
    import xml.etree.ElementTree as ET

    tar = seal(None, h, ET.Element("ConnectionCheck"))
    got = open_package(tar, [], unsigned_types=frozenset({"ConnectionCheck"}))
    assert got.document.header == h


_CITY = city_signer("ed25519")
_GOOD, _ = signed_ebm_tar(_CITY)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=4096))
def test_random_bytes_are_refused_with_a_result_code(data: bytes) -> None:
    with pytest.raises(EbdError) as info:
        open_package(data, trusted(_CITY))
    assert info.value.code in (ResultCode.PARSE_FAILURE, ResultCode.MISSING_CONTENT, ResultCode.OTHER)


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0, max_value=len(_GOOD) - 1), st.integers(min_value=0, max_value=255))
def test_truncated_or_flipped_packages_open_or_are_refused_never_crash(cut: int, byte: int) -> None:
    for tar in (_GOOD[:cut], _GOOD[:cut] + bytes([byte]) + _GOOD[cut + 1 :]):
        detail = None
        try:
            got = open_package(tar, trusted(_CITY))
        except EbdError as e:
            detail = e.detail
        if detail is None:  # a flip in padding or a header field that does not matter: the document is intact
            assert got.package.ebdb in _GOOD
        else:
            assert detail
