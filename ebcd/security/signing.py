"""Signatures in the field's 74-byte block, SM3/SM2 (gmssl) or Ed25519 (cryptography), and key files.

The block (big-endian), laid out as the field's 安全保护—数字签名 value:

    offset  size  field
    0       4     time: unix seconds when signed (u32)
    4       6     key serial: 12 decimal digits in packed BCD (the certificate serial in the field)
    10      64    signature: SM2 r‖s (32 + 32 bytes), or the Ed25519 signature

As in the field, the signature covers the message bytes only, not the time and serial beside it:
trust the time only when the message carries it too (`ebcd.security.replay.canonical_command_bytes`
does). The serial picks the key; a block whose serial the verifier does not trust is refused.

SM2 is GB/T 32918 with SM3 (GB/T 32905): e = SM3(Z_A ‖ M), Z_A over the default user id
1234567812345678. gmssl is pure Python and not constant-time (sign 8–16 ms, verify 12–32 ms,
see bench/signing.py): sign a broadcast once, never once per terminal. gmssl draws its own nonce
from `random`, so this module always hands it one from `secrets`; it also range-checks r and s,
which gmssl does not, and sets gmssl's public key itself (CryptSM2 mangles keys starting 04).

Key files. Private ones must be mode 0600 or 0400 and owned by the user reading them; public
ones must not be writable by group or others.

    ed25519  PEM (PKCS#8 private, SubjectPublicKeyInfo public) after the RFC 7468 explanatory
             lines `ebcd-scheme: ed25519` and `ebcd-serial: NNNNNNNNNNNN`; openssl reads them as is.
    sm2      JSON {"ebcd_key": 1, "scheme": "sm2", "kind": "private" | "public",
             "serial": "NNNNNNNNNNNN", "public_key": x‖y as 128 hex digits (a leading 04 is
             accepted), "private_key": d as 64 hex digits (private files only)}
"""

from __future__ import annotations

import json
import os
import re
import secrets
import stat
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from gmssl import sm2, sm3
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ebcd.security.files import FileProblem, read_checked

Scheme = Literal["sm2", "ed25519"]
SCHEMES: tuple[Scheme, ...] = ("sm2", "ed25519")

SIGNATURE_BLOCK_BYTES = 74
KEY_SERIAL_BYTES = 6
KEY_SERIAL_DIGITS = 2 * KEY_SERIAL_BYTES
RAW_SIGNATURE_BYTES = 64
MAX_SIGNED_TIME_S = 2**32 - 1
SM2_DEFAULT_USER_ID = b"1234567812345678"  # the id gmssl builds Z_A from (it cannot take another)
MAX_KEY_FILE_BYTES = 64 * 1024
PRIVATE_KEY_MODE = 0o600
PUBLIC_KEY_MODE = 0o644
KEY_DIR_MODE = 0o700
KEY_FILE_VERSION = 1

_BLOCK_HEAD = struct.Struct(">I6s")  # time, serial
_ECC = sm2.default_ecc_table
SM2_P = int(_ECC["p"], 16)
SM2_A = int(_ECC["a"], 16)
SM2_B = int(_ECC["b"], 16)
SM2_N = int(_ECC["n"], 16)
_PEM_HEADER = re.compile(r"^ebcd-(scheme|serial):[ \t]*(\S*)[ \t]*$", re.MULTILINE)


class SecurityError(Exception):
    """Base of every error `ebcd.security` raises about keys, signatures or replays."""


class KeyFileError(SecurityError):
    """A key file that cannot be read, is wrongly permitted, or holds no key of the scheme asked for."""


class SignatureFailure(StrEnum):
    """Why a signature block was refused."""

    MALFORMED = "malformed"
    UNKNOWN_KEY = "unknown_key"
    BAD_SIGNATURE = "bad_signature"


class SignatureError(SecurityError):
    """A signature block that is malformed, names a key not trusted, or does not verify."""

    def __init__(self, reason: SignatureFailure, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class SignedInfo:
    """Time (unix seconds) and key serial of a block; verified only when `Verifier.verify` returned it."""

    time: int
    serial: str


def key_serial(serial: int | str) -> str:
    """A key serial as exactly 12 decimal digits (zero-filled); ValueError if it is not one."""
    text = str(serial) if isinstance(serial, int) and not isinstance(serial, bool) else serial
    if not (isinstance(text, str) and text.isascii() and text.isdigit() and len(text) <= KEY_SERIAL_DIGITS):
        raise ValueError(f"key serial {serial!r} is not 1 to {KEY_SERIAL_DIGITS} decimal digits")
    return text.zfill(KEY_SERIAL_DIGITS)


def parse_signature(block: bytes) -> SignedInfo:
    """The time and serial a block claims, NOT verified; SignatureError(malformed) if it is no block."""
    return _split(block)[0]


def _split(block: bytes) -> tuple[SignedInfo, bytes]:
    if len(block) != SIGNATURE_BLOCK_BYTES:
        raise SignatureError(
            SignatureFailure.MALFORMED, f"block of {len(block)} bytes, expected {SIGNATURE_BLOCK_BYTES}"
        )
    time_s, serial_bcd = _BLOCK_HEAD.unpack_from(block)
    serial = serial_bcd.hex()  # 12 decimal digits in BCD read as hex are the digits themselves
    if not serial.isdigit():
        raise SignatureError(SignatureFailure.MALFORMED, f"key serial {serial.upper()} is not BCD digits")
    return SignedInfo(time_s, serial), bytes(block[_BLOCK_HEAD.size :])


def sm3_digest(data: bytes) -> bytes:
    """The SM3 digest (GB/T 32905) of `data`, 32 bytes."""
    return bytes.fromhex(sm3.sm3_hash(list(data)))


def _gmssl(private_hex: str = "", public_hex: str = "") -> Any:
    crypt = sm2.CryptSM2(private_key=private_hex, public_key="")
    # set afterwards: CryptSM2() lstrip("04")s a key that starts with 04, eating digits of x
    crypt.public_key = public_hex
    return crypt


def _sm2_base_mul(d: int) -> bytes:
    """d·G on the SM2 curve as x‖y (64 bytes)."""
    return bytes.fromhex(_gmssl()._kg(d, _ECC["g"]))


class VerifyingKey(Protocol):
    """A public key of one scheme: checks a 64-byte raw signature over a message."""

    @property
    def scheme(self) -> Scheme: ...

    def verify_raw(self, message: bytes, signature: bytes) -> bool: ...

    def file_text(self, serial: str) -> str: ...


class SigningKey(Protocol):
    """A private key of one scheme: makes 64-byte raw signatures."""

    @property
    def scheme(self) -> Scheme: ...

    def sign_raw(self, message: bytes) -> bytes: ...

    def public_key(self) -> VerifyingKey: ...

    def file_text(self, serial: str) -> str: ...


@dataclass(frozen=True, slots=True)
class Sm2VerifyingKey:
    """An SM2 public key: the curve point x‖y (64 bytes), checked to lie on the curve."""

    scheme: ClassVar[Scheme] = "sm2"
    xy: bytes

    def __post_init__(self) -> None:
        if len(self.xy) != 2 * 32:
            raise ValueError(f"SM2 public key of {len(self.xy)} bytes, expected 64 (x‖y)")
        x, y = int.from_bytes(self.xy[:32]), int.from_bytes(self.xy[32:])
        if not (x < SM2_P and y < SM2_P and (y * y - x * x * x - SM2_A * x - SM2_B) % SM2_P == 0):
            raise ValueError("SM2 public key is not a point of the SM2 curve")

    def verify_raw(self, message: bytes, signature: bytes) -> bool:
        """Whether `signature` (r‖s) is this key's SM2 signature of `message`."""
        if len(signature) != RAW_SIGNATURE_BYTES:
            return False
        r, s = int.from_bytes(signature[:32]), int.from_bytes(signature[32:])
        if not (0 < r < SM2_N and 0 < s < SM2_N):
            return False
        try:
            return bool(_gmssl(public_hex=self.xy.hex()).verify_with_sm3(signature.hex(), message))
        except (TypeError, ValueError):  # gmssl fails at the point at infinity instead of saying no
            return False

    def file_text(self, serial: str) -> str:
        """The public key file (JSON)."""
        return _sm2_json(serial, "public", public_key=self.xy.hex())


@dataclass(frozen=True, slots=True)
class Sm2SigningKey:
    """An SM2 private key d (1 ≤ d ≤ n-2) and its public key."""

    scheme: ClassVar[Scheme] = "sm2"
    d: int
    public: Sm2VerifyingKey

    def __post_init__(self) -> None:
        if not 0 < self.d < SM2_N - 1:
            raise ValueError("SM2 private key is outside 1..n-2")

    @classmethod
    def from_scalar(cls, d: int) -> Sm2SigningKey:
        """The key pair of private scalar d (computes d·G)."""
        if not 0 < d < SM2_N - 1:
            raise ValueError("SM2 private key is outside 1..n-2")
        return cls(d, Sm2VerifyingKey(_sm2_base_mul(d)))

    @classmethod
    def generate(cls) -> Sm2SigningKey:
        """A new key pair from the operating system's CSPRNG."""
        return cls.from_scalar(secrets.randbelow(SM2_N - 2) + 1)

    def public_key(self) -> Sm2VerifyingKey:
        """The matching public key."""
        return self.public

    def sign_raw(self, message: bytes) -> bytes:
        """SM2 signature r‖s of SM3(Z_A ‖ message), with a fresh nonce from `secrets`."""
        while True:
            rs = self.sign_with_nonce(message, secrets.randbelow(SM2_N - 1) + 1)
            if rs is not None:
                return rs

    def file_text(self, serial: str) -> str:
        """The private key file (JSON)."""
        return _sm2_json(serial, "private", public_key=self.public.xy.hex(), private_key=f"{self.d:064x}")

    def sign_with_nonce(self, message: bytes, k: int) -> bytes | None:
        """r‖s with nonce k, or None if k is unusable: for known-answer tests only (a known k leaks d)."""
        rs = _gmssl(f"{self.d:064x}", self.public.xy.hex()).sign_with_sm3(message, f"{k:064x}")
        return None if rs is None else bytes.fromhex(rs)


@dataclass(frozen=True, slots=True)
class Ed25519VerifyingKey:
    """An Ed25519 public key (cryptography)."""

    scheme: ClassVar[Scheme] = "ed25519"
    key: ed25519.Ed25519PublicKey

    def verify_raw(self, message: bytes, signature: bytes) -> bool:
        """Whether `signature` is this key's Ed25519 signature of `message`."""
        try:
            self.key.verify(signature, message)
        except InvalidSignature:
            return False
        return True

    def file_text(self, serial: str) -> str:
        """The public key file (PEM SubjectPublicKeyInfo after the ebcd lines)."""
        pem = self.key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return _pem_text(serial, pem)


@dataclass(frozen=True, slots=True)
class Ed25519SigningKey:
    """An Ed25519 private key (cryptography)."""

    scheme: ClassVar[Scheme] = "ed25519"
    key: ed25519.Ed25519PrivateKey

    @classmethod
    def generate(cls) -> Ed25519SigningKey:
        """A new key from the operating system's CSPRNG."""
        return cls(ed25519.Ed25519PrivateKey.generate())

    def public_key(self) -> Ed25519VerifyingKey:
        """The matching public key."""
        return Ed25519VerifyingKey(self.key.public_key())

    def sign_raw(self, message: bytes) -> bytes:
        """The 64-byte Ed25519 signature of `message`."""
        return self.key.sign(message)

    def file_text(self, serial: str) -> str:
        """The private key file (PEM PKCS#8 after the ebcd lines)."""
        pem = self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return _pem_text(serial, pem)


@dataclass(frozen=True, slots=True)
class Signer:
    """Signs messages into 74-byte blocks with one private key and its serial."""

    key: SigningKey
    serial: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "serial", key_serial(self.serial))  # "42" -> "000000000042"

    @property
    def scheme(self) -> Scheme:
        """The key's scheme."""
        return self.key.scheme

    def sign(self, message: bytes, *, now: int) -> bytes:
        """The 74-byte block: `now` (unix seconds, u32), this key's serial, the signature of `message`."""
        if not 0 <= now <= MAX_SIGNED_TIME_S:
            raise ValueError(f"time {now} does not fit the block's u32 seconds")
        return _BLOCK_HEAD.pack(now, bytes.fromhex(self.serial)) + self.key.sign_raw(message)

    def verifier(self) -> Verifier:
        """A verifier that trusts this signer's public key."""
        return Verifier({self.serial: self.key.public_key()})


class Verifier:
    """Verifies 74-byte blocks against the public keys it trusts, looked up by serial."""

    def __init__(self, keys: Mapping[str, VerifyingKey]) -> None:
        if not keys:
            raise ValueError("a verifier needs at least one public key")
        self._keys = {key_serial(serial): key for serial, key in keys.items()}

    @property
    def keys(self) -> Mapping[str, VerifyingKey]:
        """The trusted public keys by serial (merge two verifiers with `Verifier({**a.keys, **b.keys})`)."""
        return dict(self._keys)

    def verify(self, message: bytes, signature: bytes) -> SignedInfo:
        """The block's time and serial if it signs `message` with a trusted key; SignatureError otherwise."""
        info, raw = _split(signature)
        key = self._keys.get(info.serial)
        if key is None:
            trusted = ", ".join(sorted(self._keys))
            raise SignatureError(
                SignatureFailure.UNKNOWN_KEY, f"key serial {info.serial} is not trusted (trusted: {trusted})"
            )
        if not key.verify_raw(message, raw):
            raise SignatureError(
                SignatureFailure.BAD_SIGNATURE, f"{key.scheme} signature of key {info.serial} does not verify"
            )
        return info


# -- key files --------------------------------------------------------------------------------


class _Sm2File(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    ebcd_key: Literal[1]
    scheme: Literal["sm2"]
    kind: Literal["private", "public"]
    serial: str = Field(pattern=r"^[0-9]{12}$")
    public_key: str = Field(pattern=r"^(04)?[0-9a-fA-F]{128}$")
    private_key: str | None = Field(default=None, pattern=r"^[0-9a-fA-F]{64}$")


def check_scheme(scheme: str) -> Scheme:
    """`scheme` if it is one of SCHEMES; ValueError naming them otherwise."""
    for known in SCHEMES:
        if scheme == known:
            return known
    raise ValueError(f"unknown signature scheme {scheme!r}; expected one of {', '.join(SCHEMES)}")


def load_signer(path: str | os.PathLike[str], scheme: str) -> Signer:
    """The signer of a private key file; KeyFileError naming the path, the problem and the fix."""
    path, scheme = Path(path), check_scheme(scheme)
    text = _read_key_file(path, private=True)
    if scheme == "sm2":
        doc = _parse_sm2(path, text, "private")
        if doc.private_key is None:
            raise KeyFileError(f"{path}: SM2 private key file has no private_key")
        public = _sm2_public(path, doc.public_key)
        try:
            key = Sm2SigningKey(int(doc.private_key, 16), public)
        except ValueError as exc:
            raise KeyFileError(f"{path}: {exc}") from None
        if _sm2_base_mul(key.d) != public.xy:
            raise KeyFileError(f"{path}: public_key is not the public key of private_key")
        return Signer(key, doc.serial)
    serial = _pem_serial(path, text)
    try:
        pem = serialization.load_pem_private_key(text.encode(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise KeyFileError(f"{path}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(pem, ed25519.Ed25519PrivateKey):
        raise KeyFileError(f"{path}: holds a {type(pem).__name__}, not an Ed25519 private key")
    return Signer(Ed25519SigningKey(pem), serial)


def load_verifier(path: str | os.PathLike[str], scheme: str) -> Verifier:
    """A verifier trusting the public key of a key file; KeyFileError naming the path and the problem."""
    path, scheme = Path(path), check_scheme(scheme)
    text = _read_key_file(path, private=False)
    if scheme == "sm2":
        doc = _parse_sm2(path, text, "public")
        return Verifier({doc.serial: _sm2_public(path, doc.public_key)})
    serial = _pem_serial(path, text)
    try:
        pem = serialization.load_pem_public_key(text.encode())
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise KeyFileError(f"{path}: not a PEM public key ({exc})") from None
    if not isinstance(pem, ed25519.Ed25519PublicKey):
        raise KeyFileError(f"{path}: holds a {type(pem).__name__}, not an Ed25519 public key")
    return Verifier({serial: Ed25519VerifyingKey(pem)})


def generate_keypair(directory: str | os.PathLike[str], scheme: str, serial: int | str) -> tuple[Path, Path]:
    """New `{scheme}-{serial}.key` (mode 0600) and `.pub` (0644) in `directory`; never overwrites."""
    scheme = check_scheme(scheme)
    serial = key_serial(serial)
    directory = Path(directory)
    private_path = directory / f"{scheme}-{serial}.key"
    public_path = directory / f"{scheme}-{serial}.pub"
    try:
        directory.mkdir(mode=KEY_DIR_MODE, parents=True, exist_ok=True)
    except OSError as exc:
        raise KeyFileError(f"{directory}: cannot create the key directory: {exc.strerror}") from None
    for path in (private_path, public_path):
        if path.exists() or path.is_symlink():
            raise KeyFileError(
                f"{path} exists; refusing to overwrite a key: move it away or pick another serial"
            )
    key: SigningKey = Sm2SigningKey.generate() if scheme == "sm2" else Ed25519SigningKey.generate()
    write_new_key_file(private_path, key.file_text(serial), PRIVATE_KEY_MODE)
    write_new_key_file(public_path, key.public_key().file_text(serial), PUBLIC_KEY_MODE)
    return private_path, public_path


def _sm2_json(serial: str, kind: str, **keys: str) -> str:
    doc = {"ebcd_key": KEY_FILE_VERSION, "scheme": "sm2", "kind": kind, "serial": serial, **keys}
    return json.dumps(doc, indent=2) + "\n"


def _pem_text(serial: str, pem: bytes) -> str:
    return f"ebcd-scheme: ed25519\nebcd-serial: {serial}\n{pem.decode()}"


def write_new_key_file(path: Path, text: str, mode: int) -> None:
    """Create a key file with `mode` (never overwriting one), durably; KeyFileError otherwise."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    except FileExistsError:
        raise KeyFileError(f"{path} exists; refusing to overwrite a key") from None
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot create: {exc.strerror}") from None
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        os.fchmod(f.fileno(), mode)  # the umask may have taken bits away (from a public key)
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _read_key_file(path: Path, *, private: bool) -> str:
    """The text of a key file, after checking (on the open file) that its permissions are safe."""

    def check(st: os.stat_result) -> None:
        mode, me = stat.S_IMODE(st.st_mode), os.geteuid()
        if private and mode & 0o077:
            raise KeyFileError(
                f"{path}: private key file has mode {mode:04o}, open to group or others; "
                f"run `chmod 600 {path}`"
            )
        if private and st.st_uid != me:
            raise KeyFileError(
                f"{path}: private key file is owned by uid {st.st_uid}, not by uid {me} reading it; "
                f"run `chown {me} {path}`"
            )
        if not private and mode & 0o022:
            raise KeyFileError(
                f"{path}: public key file has mode {mode:04o}, writable by group or others; "
                f"run `chmod 644 {path}`"
            )

    try:
        data = read_checked(path, MAX_KEY_FILE_BYTES, check)
    except FileProblem as e:
        what = {
            "open": f"cannot open the key file: {e.strerror}",
            "not_regular": "not a regular file",
            "read": f"cannot read the key file: {e.strerror}",
            "too_large": f"larger than {MAX_KEY_FILE_BYTES} bytes, not a key file",
        }[e.problem]
        raise KeyFileError(f"{path}: {what}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise KeyFileError(f"{path}: not UTF-8 text, not a key file") from None


def _parse_sm2(path: Path, text: str, kind: str) -> _Sm2File:
    try:
        doc = _Sm2File.model_validate(json.loads(text))
    except (ValueError, ValidationError) as exc:
        hint = "; it looks like PEM (an ed25519 key?)" if "-----BEGIN" in text else ""
        detail = exc.errors()[0]["msg"] if isinstance(exc, ValidationError) else "not JSON"
        raise KeyFileError(f"{path}: not an ebcd SM2 key file ({detail}){hint}") from None
    if doc.kind != kind:
        raise KeyFileError(f"{path}: holds an SM2 {doc.kind} key, expected a {kind} key")
    return doc


def _sm2_public(path: Path, public_hex: str) -> Sm2VerifyingKey:
    raw = bytes.fromhex(public_hex)
    try:
        return Sm2VerifyingKey(raw[1:] if len(raw) == 65 else raw)
    except ValueError as exc:
        raise KeyFileError(f"{path}: {exc}") from None


def _pem_serial(path: Path, text: str) -> str:
    head = text.split("-----BEGIN", 1)[0]
    fields = dict(_PEM_HEADER.findall(head))
    if "-----BEGIN" not in text:
        hint = " (it looks like JSON: an sm2 key?)" if text.lstrip().startswith("{") else ""
        raise KeyFileError(f"{path}: not a PEM file{hint}")
    if fields.get("scheme", "ed25519") != "ed25519":
        raise KeyFileError(f"{path}: says ebcd-scheme: {fields['scheme']}, expected ed25519")
    try:
        return key_serial(fields["serial"])
    except (KeyError, ValueError):
        raise KeyFileError(
            f"{path}: no valid `ebcd-serial: NNNNNNNNNNNN` line (12 digits) above -----BEGIN; add one"
        ) from None
