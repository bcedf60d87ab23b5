"""Security building blocks, pure (no asyncio, no I/O but key files), but for `acl_probe`.

`signing`: the 74-byte signature block (u32 time + 6-byte BCD key serial + 64-byte signature)
with SM3/SM2 (gmssl) or Ed25519 (cryptography), key files and their permissions.
`replay`: the canonical bytes a command is signed over, and the terminal-side replay guard.
`reports`: terminals' signatures on their reports and presence, and the platform's check.
`acl_probe`: at start, whether an anonymous client may publish a terminal's report (MQTT, via the link).
"""
