"""EDXL-DE 1.0 envelopes: the CAP alerts an `<EDXLDistribution>` carries, each to be judged alone.

CAP often travels inside an OASIS EDXL Distribution Element 1.0 envelope:
`<EDXLDistribution>` with `<contentObject><xmlContent><embeddedXMLContent><cap:alert>`.
`read_envelope` returns None for anything that is not such an envelope (the caller reads it as
CAP or JSON), raises IngestError for an envelope that cannot be used at all, and otherwise lists
its parts: one per element inside an `<embeddedXMLContent>`, with the exact bytes of that element
(so that an enveloped XML-DSig signature on the alert still verifies), and one refusal per content
object that carries no alert (empty, text instead of XML, or `<nonXMLContent>`), whose detail the
caller prefixes with the part's path. Each part is then
judged on its own, so one empty or invalid part never sinks the valid ones.

An alert that relies on namespace declarations of the envelope (a `cap:` prefix declared on
`<EDXLDistribution>`) gets exactly those declarations added to its start tag, since its bytes
alone would not say what it is; an alert that declares its own namespaces is passed unchanged.
"""

from __future__ import annotations

import codecs
import hashlib
import re
from dataclasses import dataclass, field

from ebcd.ingest import DEFAULT_LIMITS, IngestError, Limits, Reason
from ebcd.ingest.cap_xml import Element, XmlDocument, bounded, parse_xml

EDXL_DE_NS = "urn:oasis:names:tc:emergency:EDXL:DE:1.0"
ROOT = "EDXLDistribution"
SNIFF_BYTES = 4096  # where the root start tag must begin for a payload to be taken as an envelope

# the root element's local name, after an optional BOM, XML declaration, comments and whitespace
_ROOT_NAME = re.compile(
    rb"\A(?:\xef\xbb\xbf)?\s*(?:<\?.*?\?>\s*)?(?:<!--.*?-->\s*)*<(?:[A-Za-z_][\w.-]*:)?([A-Za-z_][\w.-]*)",
    re.S,
)
_START_TAG = re.compile(rb"<[^\s/>]+(?:\s+[^\s=/>]+\s*=\s*(?:\"[^\"]*\"|'[^']*'))*\s*/?>")
_NAME = re.compile(rb"<[^\s/>]+")
_NS_DECLARATION = re.compile(rb"""\s(xmlns(?::[A-Za-z_][\w.-]*)?)\s*=\s*("[^"]*"|'[^']*')""")
_UTF16_32_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)
_DECLARED_ENCODING = re.compile(
    rb"\A(?:\xef\xbb\xbf)?<\?xml\s[^>]*?encoding\s*=\s*([\"'])([A-Za-z][\w.-]*)\1"
)


@dataclass(frozen=True, slots=True)
class Part:
    """One thing an envelope carries: the bytes of an enclosed element, or why it carries none."""

    index: int  # the part's number in the envelope, from 0
    path: str  # e.g. "contentObject[1]/xmlContent/embeddedXMLContent[0]"
    payload: bytes | None = field(default=None, repr=False)
    error: IngestError | None = None

    @property
    def sha256(self) -> str | None:
        """The digest of the part's own bytes (None for a part without an alert)."""
        return hashlib.sha256(self.payload).hexdigest() if self.payload is not None else None


@dataclass(frozen=True, slots=True)
class Envelope:
    """An EDXL-DE 1.0 distribution: its ids and its parts, in document order."""

    distribution_id: str | None
    sender_id: str | None
    parts: tuple[Part, ...]


def is_envelope(payload: bytes) -> bool:
    """Whether the payload's root element is an `<EDXLDistribution>` (cheap: reads its start only)."""
    head = payload[:SNIFF_BYTES]
    codec = next((name for bom, name in _UTF16_32_BOMS if head.startswith(bom)), None)
    if codec is not None:
        head = head.decode(codec, errors="ignore").lstrip("\ufeff").encode()
    match = _ROOT_NAME.match(head)
    return match is not None and match.group(1) == ROOT.encode()


def read_envelope(payload: bytes, limits: Limits = DEFAULT_LIMITS) -> Envelope | None:
    """The parts of an EDXL-DE 1.0 envelope; None if the payload is not one; IngestError if unusable."""
    if not is_envelope(payload):
        return None
    doc = parse_xml(payload, limits)
    root = doc.root
    if root.name != ROOT:
        return None
    if root.ns != EDXL_DE_NS:
        detail = f"EDXLDistribution: namespace {root.ns or '(none)'!r} is not EDXL-DE 1.0 ({EDXL_DE_NS})"
        raise IngestError(Reason.UNSUPPORTED, bounded(detail))
    ids = {c.name: c.text.strip()[:256] for c in root.children if c.ns == EDXL_DE_NS and not c.children}
    distribution_id = ids.get("distributionID") or None
    content = [c for c in root.children if c.ns == EDXL_DE_NS and c.name == "contentObject"]
    if not content:
        detail = f"EDXL-DE distribution {distribution_id!r} carries no contentObject"
        raise IngestError(Reason.SCHEMA, bounded(detail), distribution_id)
    parts: list[Part] = []
    declaration = _declaration(doc)
    for c, obj in enumerate(content):
        parts.extend(_parts(doc, obj, f"contentObject[{c}]", len(parts), declaration, limits))
    return Envelope(distribution_id, ids.get("senderID") or None, tuple(parts))


def _declaration(doc: XmlDocument) -> bytes:
    """An XML declaration a part needs to say its encoding: one the parsed bytes declare but UTF-8."""
    match = _DECLARED_ENCODING.match(doc.data)
    if match is None or doc.transcoded_from is not None:
        return b""
    try:
        if codecs.lookup(match.group(2).decode("ascii")).name in ("utf-8", "ascii"):
            return b""
    except LookupError:
        pass
    return b'<?xml version="1.0" encoding="%s"?>' % match.group(2)


def _parts(
    doc: XmlDocument, obj: Element, path: str, first: int, declaration: bytes, limits: Limits
) -> list[Part]:
    """The parts of one `<contentObject>`."""
    kids = [k for k in obj.children if k.ns == EDXL_DE_NS]
    xml = [k for k in kids if k.name == "xmlContent"]
    if not xml:
        other = "nonXMLContent" if any(k.name == "nonXMLContent" for k in kids) else "no xmlContent"
        why = f"{other}, not an enclosed CAP alert"
        return [Part(first, path, error=IngestError(Reason.UNSUPPORTED, why))]
    parts: list[Part] = []
    embedded = [k for k in xml[0].children if k.ns == EDXL_DE_NS and k.name == "embeddedXMLContent"]
    if not embedded:
        why = "no embeddedXMLContent"
        return [Part(first, f"{path}/xmlContent", error=IngestError(Reason.SCHEMA, why))]
    for e, holder in enumerate(embedded):
        where = f"{path}/xmlContent/embeddedXMLContent[{e}]"
        if not holder.children:
            said = "holds text, not an XML element" if holder.text.strip() else "is empty"
            error = IngestError(Reason.SCHEMA, said)
            parts.append(Part(first + len(parts), where, error=error))
            continue
        for element in holder.children:
            ancestors = (doc.root, obj, xml[0], holder)
            payload = declaration + _standalone(doc, element, ancestors, declaration, limits)
            parts.append(Part(first + len(parts), where, payload=payload))
    return parts


def _standalone(
    doc: XmlDocument, element: Element, ancestors: tuple[Element, ...], declaration: bytes, limits: Limits
) -> bytes:
    """The element's exact bytes, with the envelope's namespace declarations added only if needed."""
    start, end = doc.span(element)
    exact = doc.data[start:end]
    try:
        alone = parse_xml(declaration + exact, limits).root
        if alone.ns == element.ns:
            return exact
    except IngestError:
        pass  # e.g. an unbound prefix: the declarations are the envelope's
    inherited: dict[bytes, bytes] = {}
    for ancestor in ancestors:
        tag = _START_TAG.match(doc.data, ancestor.start)
        for name, value in _NS_DECLARATION.findall(tag.group(0) if tag else b""):
            inherited[name] = value  # an inner declaration overrides an outer one
    tag = _START_TAG.match(exact)
    own = {name for name, _ in _NS_DECLARATION.findall(tag.group(0) if tag else b"")}
    added = b"".join(b" %s=%s" % (n, v) for n, v in inherited.items() if n not in own)
    name = _NAME.match(exact)
    if not added or name is None:
        return exact
    return exact[: name.end()] + added + exact[name.end() :]
