"""XML-DSig on CAP 1.2: a sender that signs must send an `<alert>` signed, whole, by a pinned key.

An upstream sender configured to sign has one or more trusted certificates (or bare public keys)
in PEM files. `CapSignatureCheck.verify` accepts a document only when one of its enveloped
`<ds:Signature>` elements (a child of `<alert>`) verifies against one of them and that signature
covers the whole `<alert>`; anything else is an `IngestError(Reason.BAD_SIGNATURE)`.

Trust is pinned: no chain building, no system CA store, and no validity dates (real CAP feeds
are signed with certificates long expired; `expired` lists them so the daemon can warn). What
`<KeyInfo>` carries is never trusted, only named in the refusal.

Against signature wrapping, a signature counts only if its single `<Reference URI="">` covers the
document root with nothing but the enveloped-signature and canonicalization transforms, the
document holds exactly one CAP `<alert>` (the root) with `<ds:Signature>` only as its direct
children, and the content signxml reports as signed is that same alert. A document with several
signatures (NAADS and Environment Canada each sign the alert independently) is accepted when any
one of them verifies, each checked with the other `<ds:Signature>` elements removed.

Every base64 value of a signature (SignatureValue, DigestValue, certificates, key values) is
decoded strictly before anything is verified: only the base64 alphabet and whitespace, correct
padding, and the unused bits of the last character zero (RFC 4648, section 3.5). A lenient
decoder maps several texts to the same bytes, so a document whose padding bits were changed
would verify though it is not the document that was signed.

A sender may be `whitespace_tolerant`: when, and only when, strict verification fails, the check
is run once more on the document with every whitespace-only text node between elements dropped
(what pretty-printing adds or changes after signing) and nothing else changed. The README's
"Real CAP feeds" section gives the security argument.

The payload is parsed again here with a hardened lxml parser (no DTD, no entities, no network),
even though ingest has parsed it with defusedxml already.
"""

from __future__ import annotations

import base64
import binascii
import copy
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, rsa
from cryptography.x509.oid import NameOID
from lxml import etree  # type: ignore[import-untyped]
from signxml.algorithms import CanonicalizationMethod, DigestAlgorithm, SignatureMethod
from signxml.exceptions import InvalidCertificate, InvalidDigest, InvalidSignature
from signxml.verifier import SignatureConfiguration, XMLVerifier

from ebcd.ingest import MAX_PAYLOAD_BYTES, IngestError, Reason
from ebcd.ingest.cap_model import CAP12_NS, DSIG_NS

_ALERT = f"{{{CAP12_NS}}}alert"
_SIGNATURE = f"{{{DSIG_NS}}}Signature"
_ENVELOPED = "http://www.w3.org/2000/09/xmldsig#enveloped-signature"
_ALLOWED_TRANSFORMS = frozenset({_ENVELOPED, *(c.value for c in CanonicalizationMethod)})
_MAX_QUOTED = 100  # characters of sender-controlled text (Ids, subjects) quoted in a detail
_VerifyKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | dsa.DSAPublicKey
# ds: and dsig11: elements whose content is base64Binary (XML-DSig 1.1, section 4 and its schemas)
_BASE64_ELEMENTS = frozenset(
    {
        "SignatureValue",
        "DigestValue",
        "X509Certificate",
        "X509CRL",
        "X509SKI",
        "Modulus",
        "Exponent",
        "P",
        "Q",
        "G",
        "Y",
        "J",
        "Seed",
        "PgenCounter",
        "PublicKey",
        "DEREncodedKeyValue",
        "OCSPResponse",
    }
)
_DSIG11_NS = "http://www.w3.org/2009/xmldsig11#"
_XML_WHITESPACE = re.compile(r"[ \t\r\n]+")


@dataclass(frozen=True, slots=True)
class TrustedKey:
    """One configured certificate or bare public key, and the file it came from.

    A bare public key is held in a stand-in certificate (made here, never trusted for anything but
    its key), since signxml verifies with a certificate; its `not_after` is None.
    """

    path: Path
    certificate: x509.Certificate
    subject: str
    not_after: datetime | None
    spki: bytes  # the public key as DER SubjectPublicKeyInfo, to compare keys


class _Verifier(XMLVerifier):
    """signxml's verifier, with SignedInfo canonicalized correctly under a default namespace.

    lxml's inclusive C14N of an element that is not the root of its document writes `xmlns=""` on
    its grandchildren when their namespace is the default one declared above (e.g. `<Transforms>`
    in `<Signature xmlns="…xmldsig#"><SignedInfo><Reference>`), so every inclusive-C14N signature
    without a `ds:` prefix fails (cf. signxml issue #275). Canonicalizing a copy that is the root of
    its own document gives the right bytes: the copy carries every namespace in scope.
    """

    def _c14n(
        self, nodes: Any, algorithm: CanonicalizationMethod, inclusive_ns_prefixes: Any = None
    ) -> bytes:
        if isinstance(nodes, etree._Element) and nodes.getparent() is not None:
            nodes = etree.fromstring(etree.tostring(nodes), parser=self.parser)
        c14n: bytes = super()._c14n(nodes, algorithm, inclusive_ns_prefixes=inclusive_ns_prefixes)
        return c14n


class CapSignatureCheck:
    """Verifies enveloped XML-DSig signatures on CAP 1.2 documents against pinned keys."""

    def __init__(
        self,
        trusted: Sequence[TrustedKey],
        *,
        allow_sha1: bool = False,
        whitespace_tolerant: bool = False,
        max_payload_bytes: int = MAX_PAYLOAD_BYTES,
    ) -> None:
        """Trust exactly `trusted`; accept SHA-1 signature or digest methods only if `allow_sha1`;
        retry once without whitespace between elements only if `whitespace_tolerant`."""
        if not trusted:
            raise ValueError("no trusted certificate given")
        self.max_payload_bytes = max_payload_bytes
        self.trusted = tuple(trusted)
        self.allow_sha1 = allow_sha1
        self.whitespace_tolerant = whitespace_tolerant
        self._config = SignatureConfiguration(
            require_x509=True,
            location="./",  # a direct child of <alert>
            expect_references=1,
            signature_methods=frozenset(
                m
                for m in SignatureMethod
                if not m.name.startswith("HMAC") and (allow_sha1 or "SHA1" not in m.name)
            ),
            digest_algorithms=frozenset(d for d in DigestAlgorithm if allow_sha1 or "SHA1" not in d.name),
            ignore_ambiguous_key_info=True,  # KeyInfo is never trusted; the pinned key decides
        )

    @classmethod
    def from_files(
        cls,
        paths: Sequence[Path],
        *,
        allow_sha1: bool = False,
        whitespace_tolerant: bool = False,
        max_payload_bytes: int = MAX_PAYLOAD_BYTES,
    ) -> CapSignatureCheck:
        """Load PEM certificates (one or more per file) or a PEM public key per file.

        Raises ValueError naming the file that cannot be read or holds no usable key.
        """
        if not paths:
            raise ValueError("no trusted certificate file given")
        return cls(
            [key for path in paths for key in _load(Path(path))],
            allow_sha1=allow_sha1,
            whitespace_tolerant=whitespace_tolerant,
            max_payload_bytes=max_payload_bytes,
        )

    @property
    def expired(self) -> tuple[TrustedKey, ...]:
        """Configured certificates whose notAfter has passed (still trusted: dates are not enforced)."""
        now = datetime.now(UTC)
        return tuple(k for k in self.trusted if k.not_after is not None and k.not_after < now)

    def verify(self, payload: bytes, *, sender: str | None = None) -> bool:
        """Return if one signature of `payload` verifies against a trusted key and covers the alert:
        True if it did so only with whitespace between elements dropped (`whitespace_tolerant`).

        Raises IngestError(BAD_SIGNATURE) otherwise (TOO_LARGE above MAX_PAYLOAD_BYTES);
        `sender` only names the sender in the detail.
        """
        who = f"sender {_quote(sender)}" if sender else "the sender"
        if len(payload) > self.max_payload_bytes:
            raise IngestError(
                Reason.TOO_LARGE, f"payload of {len(payload)} bytes exceeds {self.max_payload_bytes}"
            )
        root = _parse(payload)
        identifier = _text(root.find(f"{{{CAP12_NS}}}identifier")) if root.tag == _ALERT else None

        def refuse(detail: str) -> IngestError:
            return IngestError(Reason.BAD_SIGNATURE, detail, identifier)

        if root.tag != _ALERT:
            raise refuse(f"root element is {_quote(root.tag)}, not a CAP 1.2 <alert>")
        if sum(1 for _ in root.iter("{*}alert")) != 1:  # in any namespace
            raise refuse("the document holds more than one <alert> (signature wrapping?)")
        signatures = root.findall(_SIGNATURE)
        if sum(1 for _ in root.iter(_SIGNATURE)) != len(signatures):
            raise refuse("a <ds:Signature> sits below a child of <alert>; only enveloped signatures count")
        if not signatures:
            raise refuse(f"{who} signs its alerts, but this document carries no <ds:Signature>")
        for signature in signatures:
            problem = _strict_base64(signature)
            if problem:
                raise refuse(problem)
        unsigned_elements = _count(root) - sum(_count(s) for s in signatures)

        strict = self._any_verifies(root, unsigned_elements, identifier, who)
        if strict is None:
            return False
        if not self.whitespace_tolerant:
            raise refuse(strict)
        normalised = _without_whitespace_between_elements(root)
        tolerant = self._any_verifies(normalised, unsigned_elements, identifier, who)
        if tolerant is None:
            return True
        raise refuse(f"{strict}; and with whitespace between elements dropped: {tolerant}")

    def _any_verifies(self, root: Any, elements: int, identifier: str | None, who: str) -> str | None:
        """None if one of the document's signatures verifies and covers the alert, else why none does."""
        signatures = root.findall(_SIGNATURE)
        failures = []
        for index, signature in enumerate(signatures):
            failure = self._check(root, index, signature, elements, identifier, who)
            if failure is None:
                return None
            label = (
                f"signature {_quote(signature.get('Id') or f'#{index + 1}')}: " if len(signatures) > 1 else ""
            )
            failures.append(label + failure)
        return "; ".join(failures)

    def _check(
        self, root: Any, index: int, signature: Any, elements: int, identifier: str | None, who: str
    ) -> str | None:
        """None if signature `index` verifies and covers the alert, else why not."""
        problem = self._precheck(signature)
        if problem:
            return problem
        document = copy.deepcopy(root)
        for other, element in enumerate(document.findall(_SIGNATURE)):
            if other != index:
                _remove(element)
        signer, signer_key = _key_info(signature)
        # Try the key KeyInfo names first: a wrong key costs a full parse of the document.
        keys = sorted(self.trusted, key=lambda k: k.spki != signer_key)
        bad_value: TrustedKey | None = None
        error: str | None = None
        for key in keys:
            config = replace(self._config, verification_time=key.certificate.not_valid_before_utc)
            try:
                result = _Verifier().verify(
                    document,
                    x509_cert=key.certificate,
                    expect_config=config,
                    parser=_parser(),
                    validate_schema=False,  # real Ids are not xs:ID ("NAADS Signature")
                )
            except InvalidDigest:
                return "digest mismatch: the alert was changed after it was signed"
            except InvalidCertificate as exc:  # a broken configured certificate must not hide the others
                error = error or f"trusted certificate {key.subject} is unusable: {_short(exc)}"
                continue
            except InvalidSignature:
                if key.spki == signer_key:
                    bad_value = key
                continue
            except Exception as exc:  # noqa: BLE001 - signxml/lxml raise many types on hostile input
                error = error or _short(exc)  # may be this key's type only: try the others
                continue
            signed = getattr(result, "signed_xml", None)
            if (
                signed is None
                or signed.tag != _ALERT
                or _text(signed.find(f"{{{CAP12_NS}}}identifier")) != identifier
                or _count(signed) != elements
            ):
                return "the signed content is not this whole <alert> (signature wrapping?)"
            return None
        if bad_value is not None:
            return f"signature value wrong for the trusted certificate {bad_value.subject}"
        if signer_key is not None and all(k.spki != signer_key for k in self.trusted):
            return f"signed by {signer}, which is not trusted for {who}"
        if error is not None:
            return f"cannot be verified: {error}"
        trusted = (
            "the trusted certificate"
            if len(self.trusted) == 1
            else f"any of the {len(self.trusted)} trusted certificates"
        )
        return f"signature value does not verify with {trusted}{f' ({signer})' if signer else ''}"

    def _precheck(self, signature: Any) -> str | None:
        """Why the (not yet verified) SignedInfo cannot make the signature count, if it cannot."""
        ds = f"{{{DSIG_NS}}}"
        references = signature.findall(f"{ds}SignedInfo/{ds}Reference")
        if len(references) != 1:
            return f"{len(references)} <Reference>s; exactly one, covering the whole <alert>, is required"
        uri = references[0].get("URI")
        if uri != "":
            return f'Reference URI {_quote(uri)} does not cover the whole <alert> (URI="" required)'
        for transform in references[0].findall(f"{ds}Transforms/{ds}Transform"):
            if transform.get("Algorithm") not in _ALLOWED_TRANSFORMS:
                return f"transform {_quote(transform.get('Algorithm'))} is not allowed"
        if not self.allow_sha1:
            methods = signature.findall(f"{ds}SignedInfo/{ds}SignatureMethod") + references[0].findall(
                f"{ds}DigestMethod"
            )
            for method in methods:
                algorithm = method.get("Algorithm") or ""
                if algorithm.lower().endswith(("sha1", "sha1-rsa-mgf1")):
                    return f"uses SHA-1 ({_quote(algorithm)}), which is accepted only with allow_sha1"
        return None


def _parser() -> Any:
    """A fresh hardened lxml parser: no DTD loading, no entity expansion, no network, size limits."""
    return etree.XMLParser(
        resolve_entities=False, no_network=True, huge_tree=False, load_dtd=False, dtd_validation=False
    )


def _parse(payload: bytes) -> Any:
    """The document's root element; refuses malformed XML, DTDs and entity references."""
    try:
        root = etree.fromstring(payload, _parser())
    except (etree.LxmlError, ValueError) as exc:
        raise IngestError(
            Reason.BAD_SIGNATURE, f"cannot parse the document to verify it: {_short(exc)}"
        ) from None
    docinfo = root.getroottree().docinfo
    if docinfo.doctype or docinfo.internalDTD is not None or docinfo.externalDTD is not None:
        raise IngestError(
            Reason.BAD_SIGNATURE, "a document type declaration is not allowed in a signed alert"
        )
    if any(True for _ in root.iter(etree.Entity)):
        raise IngestError(Reason.BAD_SIGNATURE, "entity references are not allowed in a signed alert")
    return root


def _load(path: Path) -> list[TrustedKey]:
    """The certificates or the public key in one PEM file."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"{path}: cannot read trusted certificate file: {exc.strerror or exc}") from exc
    try:
        if b"-----BEGIN CERTIFICATE-----" in data:
            certs = x509.load_pem_x509_certificates(data)
            keys = [_cert_key(path, c) for c in certs]
        elif b"PUBLIC KEY-----" in data:
            keys = [_bare_key(path, serialization.load_pem_public_key(data))]
        else:
            raise ValueError("no PEM CERTIFICATE or PUBLIC KEY block")
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path}: not a usable PEM certificate or public key: {exc}") from exc
    return keys


def _usable(key: object) -> _VerifyKey:
    """`key` if signxml can verify with it (RSA, ECDSA, DSA)."""
    if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey | dsa.DSAPublicKey):
        raise TypeError(f"{type(key).__name__} cannot verify XML-DSig (RSA, EC or DSA keys only)")
    return key


def _cert_key(path: Path, cert: x509.Certificate) -> TrustedKey:
    """A configured certificate, if its key can verify XML-DSig."""
    _usable(cert.public_key())
    return TrustedKey(path, cert, _subject(cert), cert.not_valid_after_utc, _spki(cert.public_key()))


def _bare_key(path: Path, key: object) -> TrustedKey:
    """A bare public key in a stand-in self-issued certificate (signed by a throwaway key)."""
    public = _usable(key)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"public key {path.name}")])
    stand_in = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(datetime(2000, 1, 1, tzinfo=UTC))
        .not_valid_after(datetime(9999, 12, 31, tzinfo=UTC))
        .sign(ec.generate_private_key(ec.SECP256R1()), hashes.SHA256())
    )
    return TrustedKey(path, stand_in, f"'public key in {path.name}'", None, _spki(public))


def _key_info(signature: Any) -> tuple[str, bytes | None]:
    """Who KeyInfo says signed (for the detail) and that key as DER SPKI, if KeyInfo carries one."""
    ds = f"{{{DSIG_NS}}}"
    try:
        for element in signature.iterfind(f"{ds}KeyInfo/{ds}X509Data/{ds}X509Certificate"):
            cert = x509.load_der_x509_certificate(_decode_strictly(element.text or ""))
            return f"certificate {_subject(cert)}", _spki(cert.public_key())
        rsa_value = signature.find(f"{ds}KeyInfo/{ds}KeyValue/{ds}RSAKeyValue")
        if rsa_value is not None:
            n, e = (
                int.from_bytes(_decode_strictly(rsa_value.findtext(f"{ds}{tag}") or ""))
                for tag in ("Modulus", "Exponent")
            )
            return f"the RSA key in <KeyValue> ({n.bit_length()} bits)", _spki(
                rsa.RSAPublicNumbers(e, n).public_key()
            )
    except Exception:  # noqa: BLE001 - KeyInfo is hostile input (e.g. UnsupportedAlgorithm), only named here
        return "an unreadable key in <KeyInfo>", None
    name = signature.findtext(f"{ds}KeyInfo/{ds}X509Data/{ds}X509SubjectName")
    return (f"certificate {_quote(name.strip())}" if name else ""), None


def _decode_strictly(text: str) -> bytes:
    """base64Binary content to bytes: whitespace allowed, anything else non-canonical refused."""
    compact = _XML_WHITESPACE.sub("", text)
    try:
        data = base64.b64decode(compact, validate=True)
    except binascii.Error as exc:
        raise ValueError(f"not base64: {exc}") from None
    if base64.b64encode(data).decode("ascii") != compact:
        raise ValueError("not canonical base64 (the unused bits of its last character are not zero)")
    return data


def _strict_base64(signature: Any) -> str | None:
    """Why a base64 value in a `<Signature>` is not strict base64, if one is not."""
    for element in signature.iter(etree.Element):
        qname = etree.QName(element)
        if qname.namespace in (DSIG_NS, _DSIG11_NS) and qname.localname in _BASE64_ELEMENTS:
            try:
                _decode_strictly(element.text or "")
            except ValueError as exc:
                return f"<{qname.localname}> is {exc}: refused, it is not the value that was signed"
    return None


def _without_whitespace_between_elements(root: Any) -> Any:
    """A copy of the document with every whitespace-only text node between elements dropped.

    Text before an element's first child and after each child (tails) that is whitespace only
    goes; text of an element without children (every CAP value) is kept exactly as it is.
    """
    document = copy.deepcopy(root)
    for element in document.iter():
        if len(element) and element.text is not None and not element.text.strip(" \t\r\n"):
            element.text = None
        if element is not document and element.tail is not None and not element.tail.strip(" \t\r\n"):
            element.tail = None
    return document


def _spki(key: Any) -> bytes:
    der: bytes = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return der


def _subject(cert: x509.Certificate) -> str:
    try:
        return _quote(cert.subject.rfc4514_string())
    except ValueError:
        return "'<unreadable subject>'"


def _remove(element: Any) -> None:
    """Remove an element but keep the text after it, as the enveloped-signature transform does."""
    parent = element.getparent()
    if element.tail:
        previous = element.getprevious()
        if previous is not None:
            previous.tail = (previous.tail or "") + element.tail
        else:
            parent.text = (parent.text or "") + element.tail
    parent.remove(element)


def _count(element: Any) -> int:
    """Elements in a subtree (comments and processing instructions not counted)."""
    return sum(1 for _ in element.iter(etree.Element))


def _text(element: Any) -> str | None:
    return None if element is None else (element.text or "").strip()


def _quote(text: object) -> str:
    text = str(text)
    return repr(text if len(text) <= _MAX_QUOTED else text[:_MAX_QUOTED] + "…")


def _short(exc: BaseException) -> str:
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    message = message if len(message) <= _MAX_QUOTED else message[:_MAX_QUOTED] + "…"
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__
