"""Signing figures: sign and verify cost of SM2 (gmssl) and Ed25519 on a 300-byte message.

Run from the project root: `.venv/bin/python -m bench.signing [--runs N]`. Prints the median of
many runs per operation, the SM2/Ed25519 ratio, and what that means for one 769-terminal
broadcast signed once versus once per terminal. With tongsuopy installed it also times
Tongsuo's native SM2, the faster second implementation the tests cross-check against.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

from ebcd.security.signing import Ed25519SigningKey, SigningKey, Sm2SigningKey

TERMINALS = 769
MESSAGE_BYTES = 300
NOW = 1_764_160_000


def median_ms(op: Callable[[], object], runs: int) -> float:
    """The median wall time of `op` in milliseconds over `runs` calls (after one warm-up)."""
    op()
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        op()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1000


def measure(key: SigningKey, message: bytes, runs: int) -> tuple[float, float]:
    """(sign, verify) median milliseconds for one key."""
    raw = key.sign_raw(message)
    public = key.public_key()
    if not public.verify_raw(message, raw):
        raise SystemExit(f"{key.scheme}: a fresh signature does not verify")
    return median_ms(lambda: key.sign_raw(message), runs), median_ms(
        lambda: public.verify_raw(message, raw), runs
    )


def tongsuo(message: bytes, runs: int) -> tuple[float, float] | None:
    """(sign, verify) median milliseconds of Tongsuo's native SM2, or None without tongsuopy."""
    try:
        from tongsuopy.crypto import hashes
        from tongsuopy.crypto.asymciphers import ec
    except ImportError:
        return None
    key = ec.generate_private_key(ec.SM2())
    algorithm = ec.ECDSA(hashes.SM3())
    signature = key.sign(message, algorithm)
    public = key.public_key()
    return (
        median_ms(lambda: key.sign(message, algorithm), runs),
        median_ms(lambda: public.verify(signature, message, algorithm), runs),
    )


def main() -> None:
    """Print the figures."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=200, help="runs per SM2 operation (Ed25519 gets 10x)")
    args = parser.parse_args()
    message = os.urandom(MESSAGE_BYTES)
    sm2_sign, sm2_verify = measure(Sm2SigningKey.generate(), message, args.runs)
    ed_sign, ed_verify = measure(Ed25519SigningKey.generate(), message, args.runs * 10)
    runs = f"median of {args.runs} SM2 / {args.runs * 10} Ed25519 runs"
    print(f"per operation on a {MESSAGE_BYTES}-byte message ({runs})")
    print(f"  {'':24} {'sign':>10} {'verify':>10}")
    print(f"  {'sm2 (gmssl, pure Python)':24} {sm2_sign:8.3f} ms {sm2_verify:8.3f} ms")
    print(f"  {'ed25519 (cryptography)':24} {ed_sign:8.3f} ms {ed_verify:8.3f} ms")
    native = tongsuo(message, args.runs * 10)
    if native is not None:
        print(f"  {'sm2 (tongsuopy, native)':24} {native[0]:8.3f} ms {native[1]:8.3f} ms")
    print(f"  ratio sm2/ed25519: sign {sm2_sign / ed_sign:.0f}x, verify {sm2_verify / ed_verify:.0f}x")
    print(f"\none broadcast to {TERMINALS} terminals, daemon side (signing):")
    for name, sign in (("sm2", sm2_sign), ("ed25519", ed_sign)):
        print(
            f"  {name:8} signed once {sign:8.2f} ms    "
            f"signed per terminal {sign * TERMINALS / 1000:7.2f} s of CPU"
        )
    print("terminal side (verifying): a real terminal verifies once on its own CPU; the simulated")
    print(f"fleet verifies all {TERMINALS} on this machine:")
    for name, verify in (("sm2", sm2_verify), ("ed25519", ed_verify)):
        print(f"  {name:8} {TERMINALS} verifications {verify * TERMINALS / 1000:7.2f} s of CPU")


if __name__ == "__main__":
    main()
