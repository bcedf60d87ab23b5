"""CAP ingest figures for real-sized documents: parse, area matching, memory.

Run from the project root: `.venv/bin/python -m bench.cap [--runs N]`. For each document (built
by tests/ingest/large_docs.py in the forms real feeds send) it prints its size, the median time of
`parse_cap` (bytes to a mapped request, XML rules included), the median time of matching its
areas to terminals (`District.resolve`) against the shipped ledger (769 terminals) and a generated
one of 10,000 terminals (uniform over the shipped ledger's bounding box), and the ratio of the
parse to the baseline: a typical 6 KB real alert (au-nsw-rfs-structure-fire.xml with a district
geocode) parsed in the same run. The last document is the worst case the limits admit: just
under 2 MiB, 78,000 elements, every one a geocode to check. Then, for each, the peak memory
(tracemalloc) of the parse and what matching its result to both ledgers allocates on top.
Last, XML-DSig (ECDSA P-256, a key made for the run): the strict check of a signed document,
and the `whitespace_tolerant` check of the same document pretty-printed after signing (strict
fails, then the one normalisation verifies), for a small alert and the 8-language one.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from datetime import datetime
from functools import partial
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec
from lxml import etree  # type: ignore[import-untyped]

from bench.geo import generated_district
from ebcd.config import load_config
from ebcd.ingest.cap import parse_cap
from ebcd.ingest.cap_rules import read_cap
from ebcd.ingest.xmldsig import CapSignatureCheck
from ebcd.tiers.district import District
from ebcd.tiers.loader import load_district
from tests.ingest.cap_docs import DISTRICT, FIXTURES, alert, into_district
from tests.ingest.large_docs import audio_alert, geocode_alert, languages_alert, polygon_alert
from tests.ingest.test_xmldsig import cert_pem, self_signed, sign

ROOT = Path(__file__).resolve().parents[1]
GENERATED = 10_000


def median_s(op: Callable[[], object], runs: int) -> float:
    """The median wall time of `op` in seconds over `runs` calls (after one warm-up)."""
    op()
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        op()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def documents(shipped: District) -> dict[str, bytes]:
    """The documents measured, by label."""
    lats = sorted(t.lat for t in shipped.terminals())
    lons = sorted(t.lon for t in shipped.terminals())
    box = (lats[len(lats) // 3], lons[len(lons) // 3], lats[2 * len(lats) // 3], lons[2 * len(lons) // 3])
    villages = [v.area for v in shipped.villages()][:40]
    return {
        "baseline: 6 KB real alert": into_district(
            (FIXTURES / "valid" / "au-nsw-rfs-structure-fire.xml").read_bytes()
        ),
        "inline audio 500 KB": audio_alert(500_000),
        "polygon 10,000 points": polygon_alert(box, 10_000),
        "polygon 41,009 points": polygon_alert(box, 41_009),
        "1,500 geocodes": geocode_alert(villages, 1_500),
        "8 languages x 1,500 geocodes": languages_alert(1_500),
        "worst: 26,000 geocodes, ~2 MB": geocode_alert(villages, 26_000),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=11, help="calls per median (default 11)")
    args = parser.parse_args()
    shipped = load_district(load_config(ROOT / "config" / "ebcd.toml"))
    generated = generated_district(shipped, GENERATED, random.Random(1))
    docs = documents(shipped)
    nows = {label: read_cap(doc).sent for label, doc in docs.items()}

    def parse(label: str) -> Callable[[], object]:
        return lambda: parse_cap(docs[label], district_area=DISTRICT, now=nows[label])

    header = (
        f"{'document':<30} {'bytes':>10} {'parse ms':>9} {'/base':>6} "
        f"{'match 769 ms':>13} {'in':>5} {'match 10k ms':>13} {'in':>5}"
    )
    print(header)
    print("-" * len(header))
    base_s = 0.0
    for label, doc in docs.items():
        parse_s = median_s(parse(label), args.runs)
        base_s = base_s or parse_s
        targets = parse_cap(doc, district_area=DISTRICT, now=nows[label]).request.targets
        cells = []
        for district in (shipped, generated):
            match_s = median_s(partial(district.resolve, targets), args.runs)
            cells.append((match_s, len(district.resolve(targets).terminals)))
        print(
            f"{label:<30} {len(doc):>10,} {parse_s * 1000:>9.2f} {parse_s / base_s:>6.0f} "
            f"{cells[0][0] * 1000:>13.2f} {cells[0][1]:>5} {cells[1][0] * 1000:>13.2f} {cells[1][1]:>5}"
        )
    print("(geocode targets name areas of the shipped district: the generated ledger has none of them)")

    print("\npeak memory (tracemalloc) of the parse, and of matching the result to both ledgers:")
    for label, doc in docs.items():
        parse_peak, match_peak = peaks(doc, nows[label], (shipped, generated))
        print(
            f"{label:<30} {len(doc):>10,} bytes: parse {parse_peak / 1e6:6.1f} MB "
            f"({parse_peak / len(doc):4.0f}x its size), matching {match_peak / 1e6:5.1f} MB more"
        )
    signatures(max(3, args.runs // 3))


def signatures(runs: int) -> None:
    """Strict XML-DSig against the whitespace-tolerant retry, on a small and a large document."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = self_signed(key, "bench signer")
    with tempfile.TemporaryDirectory() as folder:
        pem = Path(folder) / "signer.pem"
        pem.write_bytes(cert_pem(cert))
        check = CapSignatureCheck.from_files([pem], whitespace_tolerant=True)
    print("\nXML-DSig, ECDSA P-256 (median ms):")
    documents = {"small alert": alert(), "8 languages x 1,500 geocodes": languages_alert(1_500)}
    for label, document in documents.items():
        signed = sign(document, key, cert, algorithm="ecdsa-sha256")
        root = etree.fromstring(signed)
        etree.indent(root)
        pretty = etree.tostring(root, xml_declaration=True, encoding="UTF-8")
        assert check.verify(signed) is False
        assert check.verify(pretty) is True
        strict_s = median_s(partial(check.verify, signed), runs)
        tolerant_s = median_s(partial(check.verify, pretty), runs)
        print(
            f"{label:<30} {len(signed):>10,} bytes: strict {strict_s * 1000:8.2f}, "
            f"re-indented and tolerant {tolerant_s * 1000:8.2f} ({tolerant_s / strict_s:.1f}x)"
        )


def peaks(doc: bytes, now: datetime, districts: tuple[District, ...]) -> tuple[int, int]:
    """Peak bytes allocated while parsing `doc`, and beyond the parsed result while matching it."""
    tracemalloc.start()
    cap = parse_cap(doc, district_area=DISTRICT, now=now)
    parse_peak = tracemalloc.get_traced_memory()[1]
    held = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    for district in districts:
        district.resolve(cap.request.targets)
    match_peak = tracemalloc.get_traced_memory()[1] - held
    tracemalloc.stop()
    return parse_peak, match_peak


if __name__ == "__main__":
    main()
