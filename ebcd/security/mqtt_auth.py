"""Logging in to the broker: password files, the simulated terminals' passwords, TLS contexts.

The daemon (`[mqtt]`) and `ebcd simulate` (`[simulator]`) both read their broker login here, at
start-up, before anything connects. Paths are relative to the config file's directory. Every
problem is an `MqttAuthError` whose message starts with the config key and names the file, e.g.
`[mqtt] ca_file: /etc/ebcd/tls/ca.crt: cannot open: No such file or directory`.

Secrets (password files, TLS private keys) must not be open to others: `root:ebcd 0640` or
`ebcd 0400` are fine, `0644` is refused with the `chmod` that fixes it. A CA file must not be
writable by group or others (whoever may write it chooses whom ebcd trusts). A password is the
first line of its file, exactly what `config/mosquitto/make_passwd.sh` hashes for Mosquitto.

Terminals (`[simulator] credentials_dir`) log in as real ones do: the user name is the terminal's
23-digit resource code (the ACL's `%u`), the password the first line of the file named by that
code in the directory, the same layout as make_passwd.sh's secrets directory. A terminal without
a file of its own uses the file `_all` if there is one (a test bench's shared password;
make_passwd.sh does the same), else start-up fails naming the terminals without a password.

TLS: the broker's certificate is verified, host name included (never switched off here), against
`ca_file` if given (only those CAs), else the system's CA store; TLS 1.2 at least. `cert_file`
and `key_file` (unencrypted PEM) are presented to a broker that requires client certificates.
"""

from __future__ import annotations

import os
import ssl
import stat
from collections.abc import Iterable
from pathlib import Path

from ebcd.security.files import FileProblem, read_checked
from ebcd.security.signing import SecurityError

SHARED_FILE = "_all"  # in a credentials directory: the password of every terminal without its own
MAX_SECRET_BYTES = 64 * 1024  # a password file or a private key
MAX_CA_BYTES = 16 * 1024 * 1024  # a CA bundle (Debian's whole store is about 200 KiB)


class MqttAuthError(SecurityError):
    """A credentials or TLS file that cannot be used; the message names the config key and the file."""


def resolve(path: str, base: Path) -> Path:
    """A config path: absolute as given, else relative to the config file's directory `base`."""
    p = Path(path)
    return p if p.is_absolute() else base / p


def _read(path: Path, key: str, *, secret: bool = False, trust: bool = False, limit: int) -> bytes:
    """The bytes of a file, after checking (on the open file) that its permissions are safe."""

    def check(st: os.stat_result) -> None:
        mode = stat.S_IMODE(st.st_mode)
        if secret and mode & 0o007:
            raise MqttAuthError(
                f"{key}: {path}: mode {mode:04o}, open to others; run `chmod o= {path}` (e.g. root:ebcd 0640)"
            )
        if trust and mode & 0o022:
            raise MqttAuthError(
                f"{key}: {path}: mode {mode:04o}, writable by group or others; run `chmod go-w {path}`"
            )

    try:
        return read_checked(path, limit, check)
    except FileProblem as e:
        what = {
            "open": f"cannot open: {e.strerror}",
            "not_regular": "not a regular file",
            "read": f"cannot read: {e.strerror}",
            "too_large": f"larger than {limit} bytes",
        }[e.problem]
        raise MqttAuthError(f"{key}: {path}: {what}") from None


def read_password(path: Path, key: str) -> str:
    """The password in a secret file: its first line (a trailing CR dropped), never empty."""
    data = _read(path, key, secret=True, limit=MAX_SECRET_BYTES)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise MqttAuthError(f"{key}: {path}: not UTF-8 text") from None
    password = text.split("\n", 1)[0].removesuffix("\r")
    if not password:
        raise MqttAuthError(f"{key}: {path}: the first line (the password) is empty")
    return password


def read_secret(path: str | None, *, base: Path, key: str) -> str | None:
    """The password of a config's password file (None if the config names none)."""
    return read_password(resolve(path, base), key) if path else None


def terminal_passwords(directory: str, codes: Iterable[str], *, base: Path, key: str) -> dict[str, str]:
    """Terminal code -> password, from a credentials directory (see the module's docstring)."""
    where = resolve(directory, base)
    try:
        names = set(os.listdir(where))
    except OSError as e:
        raise MqttAuthError(f"{key}: {where}: cannot list the directory: {e.strerror}") from None
    shared = read_password(where / SHARED_FILE, key) if SHARED_FILE in names else None
    passwords: dict[str, str] = {}
    missing: list[str] = []
    for code in codes:
        if code in names:
            passwords[code] = read_password(where / code, key)
        elif shared is not None:
            passwords[code] = shared
        else:
            missing.append(code)
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise MqttAuthError(
            f"{key}: {where}: no password for {len(missing)} terminal(s): {', '.join(missing[:5])}{more}; "
            f"add a file named by each code, or a file {SHARED_FILE} for every terminal without one"
        )
    return passwords


def tls_context(
    *,
    base: Path,
    section: str,
    ca_file: str | None = None,
    cert_file: str | None = None,
    key_file: str | None = None,
    ca_key: str = "[mqtt] ca_file",
) -> ssl.SSLContext:
    """The client TLS context of `mqtts://`: the CAs of `ca_file` (named `ca_key` in errors),
    the client certificate of `cert_file` and `key_file` (of the config `section`)."""
    if ca_file:
        ca = resolve(ca_file, base)
        data = _read(ca, ca_key, trust=True, limit=MAX_CA_BYTES)
        try:
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=data.decode("ascii"))
        except (ssl.SSLError, ValueError) as e:  # UnicodeDecodeError is a ValueError
            raise MqttAuthError(f"{ca_key}: {ca}: no usable PEM CA certificate ({_why(e)})") from None
    else:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = True  # the default; stated, as it must never be turned off
    context.verify_mode = ssl.CERT_REQUIRED
    if cert_file or key_file:
        if not (cert_file and key_file):
            given, absent = ("cert_file", "key_file") if cert_file else ("key_file", "cert_file")
            raise MqttAuthError(f"{section} {given} is set without {absent}: a client certificate needs both")
        cert, key = resolve(cert_file, base), resolve(key_file, base)
        _read(cert, f"{section} cert_file", limit=MAX_CA_BYTES)  # readable: a clear error if not
        _read(key, f"{section} key_file", secret=True, limit=MAX_SECRET_BYTES)
        asked = False

        def no_passphrase() -> bytes:  # OpenSSL would otherwise prompt on the terminal
            nonlocal asked
            asked = True
            return b""

        try:
            context.load_cert_chain(cert, key, password=no_passphrase)
        except (ssl.SSLError, OSError) as e:
            if asked:
                why = "the key is encrypted: give an unencrypted PEM key (and keep it from others)"
            else:
                why = _why(e)
            raise MqttAuthError(
                f"{section} cert_file, key_file: {cert}, {key}: not a PEM certificate and its key ({why})"
            ) from None
    return context


def _why(error: Exception) -> str:
    if isinstance(error, ssl.SSLError) and error.reason:
        return str(error.reason)
    return str(error)
