"""The test-bench key pair: derived from a published seed, so it is no secret at all.

The shipped demonstration config signs with it so that `ebcd demo`, `ebcd run` and `ebcd simulate`
exercise signing and verification with nothing to set up. A daemon using it logs a warning at
start; a real installation generates its own pair with `ebcd keys generate` (docs/install.md).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ed25519

from ebcd.security.signing import (
    SM2_N,
    Ed25519SigningKey,
    Signer,
    Sm2SigningKey,
    Verifier,
    load_signer,
    load_verifier,
)

BENCH = "bench"  # the key path that means "the published test-bench key"
BENCH_SERIAL = "000000000000"
_SEED = hashlib.sha256(b"ebcd test bench key - published, not secret").digest()


def bench_signer(scheme: str) -> Signer:
    """The test-bench signer of `scheme` (ed25519 or sm2)."""
    if scheme == "sm2":
        return Signer(Sm2SigningKey.from_scalar(int.from_bytes(_SEED) % (SM2_N - 2) + 1), BENCH_SERIAL)
    if scheme == "ed25519":
        return Signer(Ed25519SigningKey(ed25519.Ed25519PrivateKey.from_private_bytes(_SEED)), BENCH_SERIAL)
    raise ValueError(f"no bench key for scheme {scheme!r}")


def signer_from(path: str, scheme: str, base: Path) -> Signer:
    """The signer a config names: the bench key, or a private key file (relative to `base`)."""
    if path == BENCH:
        return bench_signer(scheme)
    return load_signer(_resolve(path, base), scheme)


def verifier_from(path: str, scheme: str, base: Path) -> Verifier:
    """The verifier a config names: the bench key, or a public key file (relative to `base`)."""
    if path == BENCH:
        return bench_signer(scheme).verifier()
    return load_verifier(_resolve(path, base), scheme)


def _resolve(path: str, base: Path) -> Path:
    p = Path(path)
    return p if p.is_absolute() else base / p
