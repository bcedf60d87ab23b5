"""XML-DSig figures: what verifying a signed CAP document costs, next to parsing it.

Run from the project root: `.venv/bin/python -m bench.xmldsig [--runs N]`. For every signed
real-world fixture (../shared/fixtures/cap/valid/*-signed.xml) it times, in the same run, the
CAP parse ebcd does anyway (defusedxml, CAP rules, mapping: the baseline) and the signature check
against the document's own pinned certificate, and prints medians and their ratio.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import functools
import re
import statistics
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from bench.signing import median_ms
from ebcd.ingest import IngestError
from ebcd.ingest.cap import parse_cap
from ebcd.ingest.xmldsig import CapSignatureCheck

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "cap" / "valid"
CERT = re.compile(rb"<(?:\w+:)?X509Certificate>\s*([^<]+?)\s*</(?:\w+:)?X509Certificate>", re.S)


def parse(document: bytes) -> None:
    """The CAP parse every document gets; refusals (area outside the district) count as parsed."""
    with contextlib.suppress(IngestError):
        parse_cap(document, district_area="341523000000", now=datetime(2000, 1, 1, tzinfo=UTC))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=200)
    args = ap.parse_args()
    print(f"{'document':<52} {'KB':>5} {'parse ms':>9} {'verify ms':>10} {'ratio':>6}")
    ratios = []
    with tempfile.TemporaryDirectory() as tmp:
        for path in sorted(FIXTURES.glob("*-signed.xml")):
            document = path.read_bytes()
            found = CERT.search(document)
            if found is None:  # a bare <RSAKeyValue>: see tests/ingest/test_xmldsig.py
                print(f"{path.name:<52} (key in <KeyValue>, no certificate: skipped)")
                continue
            pem = Path(tmp) / f"{path.stem}.pem"
            body = base64.encodebytes(base64.b64decode(b"".join(found.group(1).split())))
            pem.write_bytes(b"-----BEGIN CERTIFICATE-----\n" + body + b"-----END CERTIFICATE-----\n")
            check = CapSignatureCheck.from_files([pem], allow_sha1=True)
            check.verify(document)  # fails loudly if it does not verify
            parse_ms = median_ms(functools.partial(parse, document), args.runs)
            verify_ms = median_ms(functools.partial(check.verify, document), args.runs)
            ratios.append(verify_ms / parse_ms)
            print(
                f"{path.name:<52} {len(document) / 1024:>5.1f} {parse_ms:>9.3f} {verify_ms:>10.3f} "
                f"{verify_ms / parse_ms:>6.2f}"
            )
    print(f"verify / parse, median over documents: {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
