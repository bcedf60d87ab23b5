"""Safe XML for CAP: bytes to a small element tree, refusing DTDs, entities and deep nesting.

defusedxml's expat parser refuses any DOCTYPE (so no entity can be declared, expanded or fetched);
the tree builder below refuses nesting deeper than `MAX_DEPTH` and more than `MAX_ELEMENTS`
elements the moment the limit is crossed. Documents in UTF-16/32 or in a multi-byte encoding
expat lacks (GB2312, GBK, GB18030, Big5) are transcoded to UTF-8 first, so every parsed document
is ASCII-compatible. Each element keeps its byte offsets in that document, which lets a later
step cut an enveloped XML-DSig `<Signature>` out of it (XML-DSig canonicalises characters, not
bytes, so verifying over the transcoded form is sound).
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass, field
from typing import Any

from defusedxml import DefusedXmlException
from defusedxml.ElementTree import DefusedXMLParser, ParseError

from ebcd.ingest import DEFAULT_LIMITS, MAX_DEPTH, MAX_ELEMENTS, IngestError, Limits, Reason

__all__ = ["MAX_DEPTH", "MAX_DETAIL_CHARS", "MAX_ELEMENTS", "Element", "XmlDocument", "bounded", "parse_xml"]
MAX_DETAIL_CHARS = 300  # details name what the sender wrote; a hostile sender writes a lot

_DECLARED_ENCODING = re.compile(
    rb"\A(?:\xef\xbb\xbf)?<\?xml\s[^>]*?encoding\s*=\s*([\"'])([A-Za-z][A-Za-z0-9._-]*)\1"
)
_DECLARATION_ENCODING = re.compile(r"\A(<\?xml\s[^>]*?encoding\s*=\s*[\"'])([A-Za-z0-9._-]*)")
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)
# Multi-byte encodings Python knows but expat does not.
_TRANSCODED_ENCODINGS = frozenset({"gb2312", "gbk", "gb18030", "big5", "big5hkscs", "cp950"})


@dataclass(slots=True, eq=False)
class Element:
    """One element: namespace, local name, attributes, its character data, children, byte span."""

    ns: str
    name: str
    attrib: dict[str, str]
    start: int
    children: list[Element] = field(default_factory=list)
    text: str = ""
    end: int = 0

    @property
    def qname(self) -> str:
        """`{namespace}name`, or `name` without a namespace."""
        return f"{{{self.ns}}}{self.name}" if self.ns else self.name


@dataclass(frozen=True, slots=True)
class XmlDocument:
    """A parsed document: its root and the exact bytes the byte offsets refer to."""

    root: Element
    data: bytes = field(repr=False)
    transcoded_from: str | None = None

    def span(self, element: Element) -> tuple[int, int]:
        """Byte offsets [start, end) of an element's markup in `data`, end tag included."""
        end = element.end
        empty_tag = not element.children and not element.text and self.data[end - 2 : end] == b"/>"
        if not empty_tag and self.data.startswith(b"</", end):
            end = self.data.index(b">", end) + 1
        return element.start, end


class _TreeBuilder:
    """Target for expat events; builds `Element`s and enforces the depth and count limits."""

    def __init__(self, limits: Limits) -> None:
        self.max_depth = limits.max_depth
        self.max_elements = limits.max_elements
        self.expat: Any = None
        self.root: Element | None = None
        self._stack: list[Element] = []
        self._text: list[list[str]] = []
        self._count = 0
        self._names: dict[str, tuple[str, str]] = {}

    def start(self, tag: str, attributes: list[str]) -> None:
        if len(self._stack) >= self.max_depth:
            raise IngestError(Reason.FORBIDDEN_XML, f"elements nested deeper than {self.max_depth} levels")
        self._count += 1
        if self._count > self.max_elements:
            raise IngestError(Reason.TOO_LARGE, f"more than {self.max_elements} elements")
        ns, name = self._names.get(tag) or self._split(tag)
        attrib = {}
        for i in range(0, len(attributes), 2):
            attrib[attributes[i].partition("}")[2] or attributes[i]] = attributes[i + 1]
        element = Element(ns, name, attrib, self.expat.CurrentByteIndex)
        if self._stack:
            self._stack[-1].children.append(element)
        else:
            self.root = element
        self._stack.append(element)
        self._text.append([])

    def _split(self, tag: str) -> tuple[str, str]:
        ns, _, name = tag.rpartition("}")
        self._names[tag] = ns, name
        return ns, name

    def end(self, tag: str) -> None:
        element = self._stack.pop()
        element.text = "".join(self._text.pop())
        element.end = self.expat.CurrentByteIndex

    def data(self, text: str) -> None:
        if self._text:
            self._text[-1].append(text)

    def close(self) -> Element | None:
        return self.root


def parse_xml(payload: bytes, limits: Limits = DEFAULT_LIMITS) -> XmlDocument:
    """Parse untrusted bytes into an `XmlDocument`, or raise IngestError saying why not."""
    if len(payload) > limits.max_payload_bytes:
        raise IngestError(
            Reason.TOO_LARGE, f"payload of {len(payload)} bytes exceeds {limits.max_payload_bytes} bytes"
        )
    data, transcoded_from = _transcode(payload)
    builder = _TreeBuilder(limits)
    parser = DefusedXMLParser(target=builder, forbid_dtd=True, forbid_entities=True, forbid_external=True)
    # defusedxml guards the expat parser itself; the element events go straight to the builder,
    # skipping ElementTree's per-element name fixing (a third of the time on large documents).
    builder.expat = expat = parser.parser
    expat.StartElementHandler = builder.start
    expat.EndElementHandler = builder.end
    try:
        parser.feed(data)
        root = parser.close()
    except DefusedXmlException as exc:
        raise IngestError(Reason.FORBIDDEN_XML, bounded(f"{type(exc).__name__}: {exc}")) from None
    except ParseError as exc:
        raise IngestError(Reason.MALFORMED_XML, bounded(f"not well-formed XML: {exc}")) from None
    except (ValueError, LookupError) as exc:  # pyexpat reports unusable encodings this way
        raise IngestError(Reason.MALFORMED_XML, bounded(f"unreadable encoding: {exc}")) from None
    if root is None:
        raise IngestError(Reason.MALFORMED_XML, "no root element")
    return XmlDocument(root, data, transcoded_from)


def bounded(detail: str) -> str:
    """A refusal detail cut to `MAX_DETAIL_CHARS`."""
    return detail if len(detail) <= MAX_DETAIL_CHARS else detail[: MAX_DETAIL_CHARS - 1] + "…"


def _transcode(payload: bytes) -> tuple[bytes, str | None]:
    """The payload, or its UTF-8 form if it is UTF-16/32 or in a multi-byte encoding expat lacks."""
    codec = next((name for bom, name in _BOMS if payload.startswith(bom)), None)
    match = _DECLARED_ENCODING.match(payload)
    if codec is None and match is not None:
        try:
            codec = codecs.lookup(match.group(2).decode("ascii")).name
        except LookupError:
            return payload, None  # expat refuses it with its own message
        if codec not in _TRANSCODED_ENCODINGS:
            return payload, None
    if codec is None:
        return payload, None
    try:
        text = payload.decode(codec)
    except UnicodeDecodeError as exc:
        raise IngestError(Reason.MALFORMED_XML, bounded(f"bytes are not {codec}: {exc}")) from None
    text = _DECLARATION_ENCODING.sub(r"\1UTF-8", text, count=1)
    return text.encode("utf-8"), codec
