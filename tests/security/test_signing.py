"""The 74-byte signature block with SM2 and Ed25519, SM2/SM3 known answers and cross-checks, key files."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from gmssl import sm2

from ebcd.security.signing import (
    SCHEMES,
    SIGNATURE_BLOCK_BYTES,
    SM2_DEFAULT_USER_ID,
    SM2_N,
    Ed25519SigningKey,
    KeyFileError,
    SecurityError,
    SignatureError,
    SignatureFailure,
    SignedInfo,
    Signer,
    Sm2SigningKey,
    Sm2VerifyingKey,
    Verifier,
    generate_keypair,
    key_serial,
    load_signer,
    load_verifier,
    parse_signature,
    sm3_digest,
)

NOW = 1_764_160_000
MESSAGE = bytes(range(256)) + b"x" * 44  # 300 bytes, every byte value

# GB/T 32905-2016 (SM3) examples 1 and 2
SM3_ABC = "66c7f0f462eeedd9d1f2d46bdc10e4e24167c4875cf2f7a2297da02b8f4ba8e0"
SM3_ABCD_16 = "debe9ff92275b8a138604889c18e5a4d6fdb70e5387e5765293dcba39c0c5732"

# The SM2 signature example on the recommended curve (GM/T 0003.5-2012 / GB/T 32918.5 annex),
# reproduced alike by the test suites of several independent SM2 implementations.
STD_D = 0x3945208F7B2144B13F36E38AC6D39F95889393692860B51A42FB81EF4DF7C5B8
STD_X = "09F9DF311E5421A150DD7D161E4BC5C672179FAD1833FC076BB08FF356F35020"
STD_Y = "CCEA490CE26775A52DC6EA718CC1AA600AED05FBF35E084A6632F6072DA9AD13"
STD_MSG = b"message digest"
STD_ZA = "B2E14C5C79C6DF5B85F4FE7ED8DB7A262B9DA7E07CCB0EA9F4747B8CCDA8A4F3"
STD_E = "F0B43E94BA45ACCAACE692ED534382EB17E6AB5A19CE7B31F4486FDFC0D28640"
STD_K = 0x59276E27D506861A16680F3AD9C02DCCEF3CC1FA3CDBE4CE6D54B80DEAC1BC21
STD_R = "F5A03B0648D2C4630EEAC513E1BB81A15944DA3827D5B74143AC7EACEEE720B3"
STD_S = "B1B6AA29DF212FD8763182BC0D421CA1BB9038FD1F7F42D4840B69C485BBC1AA"
SM2_CURVE_ABG = (
    "FFFFFFFEFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF00000000FFFFFFFFFFFFFFFC"
    "28E9FA9E9D9F5E344D5A9E4BCF6509A7F39789F515AB8F92DDBCBD414D940E93"
    "32C4AE2C1F1981195F9904466A39C9948FE30BBFF2660BE1715A4589334C74C7"
    "BC3736A2F4F6779C59BDCEE36B692153D0A9877CC62A474002DF32E52139F0A0"
)

# A private key whose public x starts 0404...: gmssl's CryptSM2 lstrip("04")s such a key.
D_04 = 0x5EED00000000000000000000000000000000000000000000001D09
PUB_04 = (
    "0404d0a511233765968082b6b5ebe0eb363ec5165cebe6f17b4dcf23fd128053"
    "179de0deb658e90823ec6313903e914b65ae475f444d950f429d868500f40b52"
)


@pytest.fixture(scope="module", params=SCHEMES)
def signer(request: pytest.FixtureRequest) -> Signer:
    if request.param == "sm2":
        return Signer(Sm2SigningKey.generate(), "000000000001")
    return Signer(Ed25519SigningKey.generate(), "000000000001")


@pytest.fixture(scope="module")
def sm2_signer() -> Signer:
    return Signer(Sm2SigningKey.generate(), "123456789012")


def flip(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    out[bit // 8] ^= 0x80 >> (bit % 8)
    return bytes(out)


# -- the block ------------------------------------------------------------------------------


def test_round_trip(signer: Signer) -> None:
    block = signer.sign(MESSAGE, now=NOW)
    assert signer.verifier().verify(MESSAGE, block) == SignedInfo(NOW, "000000000001")
    assert signer.verifier().verify(b"", signer.sign(b"", now=0)) == SignedInfo(0, "000000000001")


def test_layout(signer: Signer) -> None:
    block = Signer(signer.key, "201907310042").sign(MESSAGE, now=0x69_26_F2_00)
    assert len(block) == SIGNATURE_BLOCK_BYTES == 74
    assert block[:4] == bytes.fromhex("6926F200")  # u32 big-endian time
    assert block[4:10] == bytes.fromhex("201907310042")  # 12 digits, packed BCD
    assert parse_signature(block) == SignedInfo(0x6926F200, "201907310042")


def test_flipped_message_bit_fails(signer: Signer) -> None:
    block = signer.sign(MESSAGE, now=NOW)
    for bit in (0, 7, 1234, len(MESSAGE) * 8 - 1):
        with pytest.raises(SignatureError) as info:
            signer.verifier().verify(flip(MESSAGE, bit), block)
        assert info.value.reason is SignatureFailure.BAD_SIGNATURE
    with pytest.raises(SignatureError):
        signer.verifier().verify(MESSAGE + b"\x00", block)


def test_flipped_signature_bit_fails(signer: Signer) -> None:
    block = signer.sign(MESSAGE, now=NOW)
    bits = range(80, 74 * 8) if signer.scheme == "ed25519" else (80, 81, 300, 335, 336, 500, 74 * 8 - 1)
    for bit in bits:
        with pytest.raises(SignatureError) as info:
            signer.verifier().verify(MESSAGE, flip(block, bit))
        assert info.value.reason is SignatureFailure.BAD_SIGNATURE


def test_time_is_not_signed_but_serial_picks_the_key(signer: Signer) -> None:
    """As in the field, the signature covers the message only; commands carry their time inside."""
    block = signer.sign(MESSAGE, now=NOW)
    assert signer.verifier().verify(MESSAGE, flip(block, 31)).time == NOW ^ 1
    with pytest.raises(SignatureError) as info:
        signer.verifier().verify(MESSAGE, flip(block, 79))  # serial ...01 -> ...00
    assert info.value.reason is SignatureFailure.UNKNOWN_KEY
    with pytest.raises(SignatureError) as info:
        signer.verifier().verify(MESSAGE, flip(flip(block, 32), 34))  # a nibble 0xA: not BCD
    assert info.value.reason is SignatureFailure.MALFORMED


def test_different_key_fails(signer: Signer) -> None:
    other = Signer(Sm2SigningKey.generate() if signer.scheme == "sm2" else Ed25519SigningKey.generate(), "1")
    assert other.serial == signer.serial
    with pytest.raises(SignatureError) as info:
        other.verifier().verify(MESSAGE, signer.sign(MESSAGE, now=NOW))
    assert info.value.reason is SignatureFailure.BAD_SIGNATURE
    with pytest.raises(SignatureError) as info:
        Verifier({"2": other.key.public_key()}).verify(MESSAGE, signer.sign(MESSAGE, now=NOW))
    assert info.value.reason is SignatureFailure.UNKNOWN_KEY
    assert "000000000002" in str(info.value)


def test_malformed_blocks(signer: Signer) -> None:
    block = signer.sign(MESSAGE, now=NOW)
    for bad in (b"", block[:-1], block + b"\x00", block[:64]):
        with pytest.raises(SignatureError) as info:
            signer.verifier().verify(MESSAGE, bad)
        assert info.value.reason is SignatureFailure.MALFORMED
        assert isinstance(info.value, SecurityError)


def test_verifier_trusts_several_keys_of_either_scheme() -> None:
    old, new = Signer(Ed25519SigningKey.generate(), "7"), Signer(Sm2SigningKey.generate(), "8")
    both = Verifier({**old.verifier().keys, **new.verifier().keys})
    assert both.verify(b"m", old.sign(b"m", now=1)).serial == "000000000007"
    assert both.verify(b"m", new.sign(b"m", now=2)).serial == "000000000008"


def test_sign_refuses_a_time_outside_u32(signer: Signer) -> None:
    for now in (-1, 2**32):
        with pytest.raises(ValueError, match="u32"):
            signer.sign(b"m", now=now)


def test_key_serial() -> None:
    assert key_serial(42) == key_serial("42") == "000000000042"
    assert key_serial("999999999999") == "999999999999"
    for bad in (-1, 10**12, "", "12a", "1234567890123", " 1", True):
        with pytest.raises(ValueError, match="key serial"):
            key_serial(bad)
    assert Signer(Ed25519SigningKey.generate(), "42").serial == "000000000042"


# -- SM3 and SM2 against the standards and a second implementation -------------------------------


def test_sm3_known_answers() -> None:
    assert sm3_digest(b"abc").hex() == SM3_ABC
    assert sm3_digest(b"abcd" * 16).hex() == SM3_ABCD_16


def test_sm2_standard_example() -> None:
    key = Sm2SigningKey.from_scalar(STD_D)
    assert key.public.xy.hex().upper() == STD_X + STD_Y
    entl = (8 * len(SM2_DEFAULT_USER_ID)).to_bytes(2)
    za = sm3_digest(entl + SM2_DEFAULT_USER_ID + bytes.fromhex(SM2_CURVE_ABG + STD_X + STD_Y))
    assert za.hex().upper() == STD_ZA
    assert sm3_digest(za + STD_MSG).hex().upper() == STD_E
    rs = key.sign_with_nonce(STD_MSG, STD_K)
    assert rs is not None
    assert rs.hex().upper() == STD_R + STD_S
    assert Signer(key, "0").verifier().verify(STD_MSG, b"\0" * 10 + rs).time == 0
    assert not key.public.verify_raw(b"message digesT", rs)


def test_sm2_public_key_starting_04() -> None:
    key = Sm2SigningKey.from_scalar(D_04)
    assert key.public.xy.hex() == PUB_04
    assert sm2.CryptSM2(private_key="", public_key=PUB_04).public_key != PUB_04  # what we work around
    assert key.public.verify_raw(MESSAGE, key.sign_raw(MESSAGE))


def test_sm2_nonces_are_fresh(sm2_signer: Signer) -> None:
    assert sm2_signer.sign(MESSAGE, now=NOW) != sm2_signer.sign(MESSAGE, now=NOW)


def test_sm2_refuses_r_and_s_out_of_range(sm2_signer: Signer) -> None:
    public = sm2_signer.key.public_key()
    rs = sm2_signer.key.sign_raw(MESSAGE)
    r, s = rs[:32], rs[32:]
    for bad in (bytes(32) + s, r + bytes(32), SM2_N.to_bytes(32) + s, r + SM2_N.to_bytes(32), rs[:-1]):
        assert not public.verify_raw(MESSAGE, bad)


def test_sm2_public_key_must_be_on_the_curve() -> None:
    with pytest.raises(ValueError, match="not a point"):
        Sm2VerifyingKey(bytes.fromhex(STD_X + STD_Y[:-1] + "4"))
    with pytest.raises(ValueError, match="64"):
        Sm2VerifyingKey(bytes(65))


def _tongsuo_key(d: int):  # type: ignore[no-untyped-def]  # tongsuopy ships no types
    ec = pytest.importorskip("tongsuopy.crypto.asymciphers.ec")
    return ec.derive_private_key(d, ec.SM2())


@pytest.mark.parametrize("length", [0, 1, 55, 56, 64, 300])
def test_sm2_cross_checked_with_tongsuo(length: int) -> None:
    """gmssl signs, Tongsuo verifies; Tongsuo signs, gmssl verifies; both hash alike (SM3)."""
    ec = pytest.importorskip("tongsuopy.crypto.asymciphers.ec")
    hashes = pytest.importorskip("tongsuopy.crypto.hashes")
    encode = pytest.importorskip("tongsuopy.crypto.asymciphers.utils").encode_dss_signature
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

    message = os.urandom(length)
    ours = Sm2SigningKey.generate()
    theirs = _tongsuo_key(ours.d)
    numbers = theirs.public_key().public_numbers()
    assert ours.public.xy == numbers.x.to_bytes(32) + numbers.y.to_bytes(32)
    rs = ours.sign_raw(message)
    r, s = int.from_bytes(rs[:32]), int.from_bytes(rs[32:])
    theirs.public_key().verify(encode(r, s), message, ec.ECDSA(hashes.SM3()))
    r, s = decode_dss_signature(theirs.sign(message, ec.ECDSA(hashes.SM3())))
    assert ours.public.verify_raw(message, r.to_bytes(32) + s.to_bytes(32))
    assert not ours.public.verify_raw(message + b"!", r.to_bytes(32) + s.to_bytes(32))
    digest = hashes.Hash(hashes.SM3())
    digest.update(message)
    assert sm3_digest(message) == digest.finalize()


def test_tongsuo_agrees_on_the_standard_example() -> None:
    ec = pytest.importorskip("tongsuopy.crypto.asymciphers.ec")
    hashes = pytest.importorskip("tongsuopy.crypto.hashes")
    encode = pytest.importorskip("tongsuopy.crypto.asymciphers.utils").encode_dss_signature
    signature = encode(int(STD_R, 16), int(STD_S, 16))
    _tongsuo_key(STD_D).public_key().verify(signature, STD_MSG, ec.ECDSA(hashes.SM3()))


# -- key files ------------------------------------------------------------------------------


@pytest.fixture
def umask_077() -> Iterator[None]:
    old = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.usefixtures("umask_077")
def test_generate_keypair(tmp_path: Path, scheme: str) -> None:
    private, public = generate_keypair(tmp_path / "keys", scheme, 42)
    assert (private.name, public.name) == (f"{scheme}-000000000042.key", f"{scheme}-000000000042.pub")
    assert (mode(private), mode(public), mode(tmp_path / "keys")) == (0o600, 0o644, 0o700)
    signer, verifier = load_signer(private, scheme), load_verifier(public, scheme)
    assert (signer.scheme, signer.serial) == (scheme, "000000000042")
    assert verifier.verify(MESSAGE, signer.sign(MESSAGE, now=NOW)) == SignedInfo(NOW, "000000000042")
    with pytest.raises(KeyFileError, match="refusing to overwrite"):
        generate_keypair(tmp_path / "keys", scheme, "42")
    other = "sm2" if scheme == "ed25519" else "ed25519"
    with pytest.raises(KeyFileError, match=str(private)):
        load_signer(private, other)
    with pytest.raises(KeyFileError, match=str(public)):
        load_verifier(public, other)
    with pytest.raises(KeyFileError, match=r"private|public"):
        load_verifier(private, scheme)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_private_key_open_to_others_is_refused(tmp_path: Path, scheme: str) -> None:
    private, _ = generate_keypair(tmp_path, scheme, 1)
    private.chmod(0o644)
    with pytest.raises(KeyFileError) as info:
        load_signer(private, scheme)
    assert str(private) in str(info.value)
    assert "0644" in str(info.value)
    assert f"chmod 600 {private}" in str(info.value)
    for ok in (0o400, 0o600):
        private.chmod(ok)
        load_signer(private, scheme)
    private.chmod(0o640)
    with pytest.raises(KeyFileError, match="0640"):
        load_signer(private, scheme)


def test_public_key_writable_by_others_is_refused(tmp_path: Path) -> None:
    _, public = generate_keypair(tmp_path, "ed25519", 1)
    public.chmod(0o666)
    with pytest.raises(KeyFileError, match=f"chmod 644 {public}"):
        load_verifier(public, "ed25519")
    public.chmod(0o444)
    load_verifier(public, "ed25519")


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a file away")
def test_private_key_of_another_user_is_refused(tmp_path: Path) -> None:
    private, _ = generate_keypair(tmp_path, "ed25519", 1)
    os.chown(private, 4242, -1)
    with pytest.raises(KeyFileError, match="uid 4242"):
        load_signer(private, "ed25519")


def test_key_file_problems_name_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "none.key"
    with pytest.raises(KeyFileError, match=f"{missing}: cannot open"):
        load_signer(missing, "sm2")
    with pytest.raises(KeyFileError, match="not a regular file"):
        load_verifier(tmp_path, "sm2")
    with pytest.raises(ValueError, match="unknown signature scheme"):
        load_verifier(missing, "rsa")


def write(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def test_ed25519_pem_needs_the_serial_line(tmp_path: Path) -> None:
    pem = (
        ed25519.Ed25519PrivateKey.generate()
        .private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        .decode()
    )
    with pytest.raises(KeyFileError, match="ebcd-serial"):
        load_signer(write(tmp_path / "a.key", pem), "ed25519")
    assert load_signer(write(tmp_path / "b.key", "ebcd-serial: 000000000005\n" + pem), "ed25519").serial == (
        "000000000005"
    )
    with pytest.raises(KeyFileError, match="ebcd-scheme: sm2"):
        load_signer(
            write(tmp_path / "c.key", "ebcd-scheme: sm2\nebcd-serial: 000000000005\n" + pem), "ed25519"
        )
    encrypted = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    with pytest.raises(KeyFileError, match="unencrypted"):
        load_signer(write(tmp_path / "d.key", "ebcd-serial: 1\n" + encrypted.decode()), "ed25519")


def test_sm2_json_files(tmp_path: Path) -> None:
    private, public = generate_keypair(tmp_path, "sm2", 9)
    doc = json.loads(public.read_text())
    assert doc == {"ebcd_key": 1, "scheme": "sm2", "kind": "public", "serial": "000000000009",
                   "public_key": doc["public_key"]}  # fmt: skip
    prefixed = write(tmp_path / "04.pub", json.dumps(doc | {"public_key": "04" + doc["public_key"]}), 0o644)
    assert set(load_verifier(prefixed, "sm2").keys) == {"000000000009"}
    off_curve = doc | {"public_key": doc["public_key"][:-1] + ("0" if doc["public_key"][-1] != "0" else "1")}
    with pytest.raises(KeyFileError, match="not a point"):
        load_verifier(write(tmp_path / "a.pub", json.dumps(off_curve), 0o644), "sm2")
    with pytest.raises(KeyFileError, match=r"[Ee]xtra"):
        load_verifier(write(tmp_path / "b.pub", json.dumps(doc | {"comment": "x"}), 0o644), "sm2")
    with pytest.raises(KeyFileError, match="holds an SM2 public key"):
        load_signer(write(tmp_path / "c.key", json.dumps(doc)), "sm2")
    secret = json.loads(private.read_text())
    other = Sm2SigningKey.generate().public.xy.hex()
    with pytest.raises(KeyFileError, match="not the public key of private_key"):
        load_signer(write(tmp_path / "d.key", json.dumps(secret | {"public_key": other})), "sm2")
    with pytest.raises(KeyFileError, match="outside"):
        load_signer(write(tmp_path / "e.key", json.dumps(secret | {"private_key": "0" * 64})), "sm2")
    with pytest.raises(KeyFileError, match="looks like PEM"):
        load_signer(write(tmp_path / "f.key", "ebcd-serial: 1\n-----BEGIN PRIVATE KEY-----\n"), "sm2")
