"""Terminals' own signatures on their reports and presence, and the platform's check of them.

The threat (README, "Threat model"): on a broker without the shipped ACL anyone can publish on
`t/{t}/report` and `t/{t}/presence`, so a forged `done` completes an alert that never played, a
forged refusal hides an acknowledgement, a forged will marks a live terminal offline. With a key
per terminal, ebcd believes only what the terminal itself signed.

Signature. The same 74-byte block as commands (`ebcd.security.signing`: u32 time + 6-byte key
serial + 64-byte signature), made with the terminal's own private key, carried in the JSON as
"sig" (hex). It covers the canonical bytes below, which contain the block's time, so the time is
authenticated; the terminal is named by its topic, and its code is in the bytes, so one
terminal's report is never valid for another. The key serial must be the one of the terminal's
key file (a terminal has one key; a new batch of keys gets a new serial).

Canonical bytes (RFC 8785 JSON, as `ebcd.security.replay` does for commands: compact, sorted
keys, UTF-8; integers below 2**53):

    report    {"alert", "cause" (only when non-empty, as on MQTT), "msg": "report", "rev", "seq",
               "status", "terminal", "time", "v": 1}
    presence  {"heartbeat", "msg": "presence", "playing" (only when non-empty), "session",
               "state", "terminal", "time", "v": 1}

"msg" keeps a report's signature from ever passing as a presence's, and neither has the "op"
of a command.

Freshness. The signed time must be within `window_s` of the platform's clock (either way), or
the message is `stale`: a captured report cannot be replayed later. Within the window a replay
repeats what the terminal said, which the delivery core takes as a repeat. Two exceptions:
- a last will is composed (and signed) when its connection opens and published by the broker
  whenever that connection dies, maybe days later: an `offline` presence is refused only when
  it is signed more than `window_s` in the future. It is ordered by its session instead: a will
  of an older session is ignored (`ebcd.delivery.liveness`), and a replayed will of the current
  session holds only until the terminal's next heartbeat;
- reports a broker queued for ebcd while it was away for longer than the window are refused as
  stale; the deliveries they answered are retried, and the terminal acknowledges the re-sent
  command again, so such an acknowledgement arrives late, not never.

Keys. `[security] terminal_keys_dir` holds one public key file per terminal, named by its
23-digit code: `<code>.pub` (Ed25519 PEM or SM2 JSON, as `ebcd.security.signing` writes them,
scheme told by the content; not writable by group or others, and the folder neither). No folder
configured: `ReportVerifier.disabled()` accepts everything, and the broker's ACL is the only
defence. A folder configured: a terminal without a key file is refused (`unknown_terminal_key`).
Cost: a verification per report and presence. Measured on a busy 2-core machine, canonical
bytes included: Ed25519 0.18 ms (a district-wide alert brings ~2,300 reports: ~0.4 s of CPU, more
than the rest of the alert costs ebcd); SM2 in pure Python (gmssl) 26 ms (~60 s for the same
alert), so SM2 terminal keys need a native SM2 (tongsuopy, ~0.3 ms). Every forged message costs
a verification too: a flood is bounded by the broker, not by this check.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
import time
from collections.abc import Callable, Iterable, Mapping
from enum import StrEnum
from pathlib import Path
from typing import Any

from ebcd.protocols.messages import Liveness, TerminalPresence, TerminalReport
from ebcd.security.files import FileProblem, read_checked
from ebcd.security.replay import REPLAY_WINDOW_S
from ebcd.security.signing import (
    KEY_DIR_MODE,
    MAX_KEY_FILE_BYTES,
    PRIVATE_KEY_MODE,
    PUBLIC_KEY_MODE,
    Ed25519SigningKey,
    KeyFileError,
    Scheme,
    SignatureError,
    SignatureFailure,
    Signer,
    SigningKey,
    Sm2SigningKey,
    Verifier,
    check_scheme,
    key_serial,
    load_signer,
    load_verifier,
    parse_signature,
    write_new_key_file,
)

CANONICAL_VERSION = 1
PUBLIC_SUFFIX = ".pub"
PRIVATE_SUFFIX = ".key"
PUBLIC_DIR = "public"  # `generate_terminal_keys` writes <out>/public/<code>.pub ...
PRIVATE_DIR = "private"  # ... and <out>/private/<code>.key
PUBLIC_DIR_MODE = 0o755
_CODE = re.compile(r"^[0-9]{23}$")


class ReportRefusal(StrEnum):
    """Why a report or presence is not believed (besides "signature: <SignatureFailure>")."""

    UNSIGNED = "unsigned"
    UNKNOWN_TERMINAL_KEY = "unknown_terminal_key"
    STALE = "stale"


def _canonical(fields: dict[str, Any]) -> bytes:
    fields["v"] = CANONICAL_VERSION
    text = json.dumps(fields, ensure_ascii=False, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return text.encode("utf-8")  # UnicodeEncodeError (a ValueError) on a lone surrogate


def canonical_report_bytes(report: TerminalReport, time_s: int) -> bytes:
    """The bytes a terminal signs for `report` at unix second `time_s` (its signature block's time)."""
    fields: dict[str, Any] = {
        "msg": "report",
        "terminal": report.terminal,
        "alert": report.alert_id,
        "rev": report.revision,
        "status": report.status.value,
        "seq": report.seq,
        "time": time_s,
    }
    if report.cause:  # only when non-empty: MQTT carries no empty cause, so "" and None are one
        fields["cause"] = report.cause
    return _canonical(fields)


def canonical_presence_bytes(presence: TerminalPresence, time_s: int) -> bytes:
    """The bytes a terminal signs for `presence` at unix second `time_s` (its signature block's time)."""
    fields: dict[str, Any] = {
        "msg": "presence",
        "terminal": presence.terminal,
        "state": presence.state.value,
        "session": presence.session,
        "heartbeat": presence.heartbeat,
        "time": time_s,
    }
    if presence.playing:
        fields["playing"] = list(presence.playing)
    return _canonical(fields)


def sign_report(signer: Signer, report: TerminalReport, *, now: float) -> bytes:
    """The 74-byte block for `report`, timed `now` (unix seconds): set it as `report.signature`."""
    t = math.floor(now)
    return signer.sign(canonical_report_bytes(report, t), now=t)


def sign_presence(signer: Signer, presence: TerminalPresence, *, now: float) -> bytes:
    """The 74-byte block for `presence`, timed `now` (unix seconds): set it as `presence.signature`."""
    t = math.floor(now)
    return signer.sign(canonical_presence_bytes(presence, t), now=t)


class ReportVerifier:
    """Each terminal's public key: believes a report or presence only if that terminal signed it, lately.

    Every check returns None (believe it) or the reason not to: "unsigned", "unknown_terminal_key",
    "stale", or "signature: malformed|unknown_key|bad_signature". With no keys at all (`disabled()`)
    every check returns None: nothing is verified, as before terminals signed.
    """

    def __init__(
        self,
        keys: Mapping[str, Verifier],
        *,
        window_s: float = REPLAY_WINDOW_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not (math.isfinite(window_s) and window_s > 0):
            raise ValueError(f"window_s must be a positive number of seconds, got {window_s}")
        self._keys = dict(keys)
        self.window_s = window_s
        self._clock = clock

    @classmethod
    def disabled(cls) -> ReportVerifier:
        """A verifier that believes everything: no terminal keys are configured."""
        return cls({})

    @classmethod
    def from_dir(
        cls,
        directory: str | os.PathLike[str],
        *,
        window_s: float = REPLAY_WINDOW_S,
        clock: Callable[[], float] = time.time,
    ) -> ReportVerifier:
        """The verifier of a folder of `<code>.pub` files; KeyFileError naming the file and the fix."""
        return cls(load_terminal_keys(directory), window_s=window_s, clock=clock)

    @property
    def enabled(self) -> bool:
        """Whether anything is checked (some terminal key is configured)."""
        return bool(self._keys)

    @property
    def terminals(self) -> frozenset[str]:
        """The codes of the terminals whose key is known."""
        return frozenset(self._keys)

    def missing(self, codes: Iterable[str]) -> list[str]:
        """Of `codes`, those without a key (all of whose messages are refused), when enabled."""
        return [c for c in codes if c not in self._keys] if self._keys else []

    def check_report(self, report: TerminalReport, sig: bytes, *, now: float | None = None) -> str | None:
        """None if `report.terminal` signed `report` with `sig` within the window, else why not."""
        return self._check(report.terminal, sig, lambda t: canonical_report_bytes(report, t), now, will=False)

    def check_presence(
        self, presence: TerminalPresence, sig: bytes, *, now: float | None = None
    ) -> str | None:
        """As `check_report`; an `offline` presence (a last will) may be older than the window."""
        return self._check(
            presence.terminal,
            sig,
            lambda t: canonical_presence_bytes(presence, t),
            now,
            will=presence.state is Liveness.OFFLINE,
        )

    def _check(
        self, terminal: str, sig: bytes, message: Callable[[int], bytes], now: float | None, *, will: bool
    ) -> str | None:
        if not self._keys:
            return None
        verifier = self._keys.get(terminal)
        if verifier is None:
            return ReportRefusal.UNKNOWN_TERMINAL_KEY.value
        if not sig:
            return ReportRefusal.UNSIGNED.value
        try:
            claimed = parse_signature(sig)
            try:
                signed = message(claimed.time)
            except ValueError as exc:  # a lone surrogate in a field
                raise SignatureError(SignatureFailure.MALFORMED, f"no canonical form: {exc}") from None
            info = verifier.verify(signed, sig)
        except SignatureError as e:
            return f"signature: {e.reason.value}"
        now = self._clock() if now is None else now
        # written as "inside" so that a NaN clock refuses rather than lets through
        too_old = not will and not (info.time >= now - self.window_s)
        if too_old or not (info.time <= now + self.window_s):
            return ReportRefusal.STALE.value
        return None


def report_verifier_from(
    terminal_keys_dir: str | None, base: Path, *, window_s: float = REPLAY_WINDOW_S
) -> ReportVerifier:
    """The verifier `[security] terminal_keys_dir` names (relative to `base`, the config's folder),
    or `ReportVerifier.disabled()` when it is unset; KeyFileError naming the file and the fix."""
    if terminal_keys_dir is None:
        return ReportVerifier.disabled()
    path = Path(terminal_keys_dir)
    return ReportVerifier.from_dir(path if path.is_absolute() else base / path, window_s=window_s)


def load_terminal_keys(directory: str | os.PathLike[str]) -> dict[str, Verifier]:
    """code -> verifier of every `<code>.pub` in `directory`; KeyFileError for anything unsafe or
    unreadable, a file not named by a 23-digit code, or a folder holding none."""
    directory = Path(directory)
    _check_dir(directory, "terminal key folder")
    keys: dict[str, Verifier] = {}
    for path in sorted(directory.iterdir()):
        if path.suffix != PUBLIC_SUFFIX:
            continue  # private keys of a bench that keeps both, READMEs
        if not _CODE.fullmatch(path.stem):
            raise KeyFileError(
                f"{path}: a terminal's public key is named by its 23-digit code, <code>{PUBLIC_SUFFIX}"
            )
        keys[path.stem] = load_verifier(path, _scheme_of(path))
    if not keys:
        raise KeyFileError(
            f"{directory}: no <code>{PUBLIC_SUFFIX} files; make them with "
            "`ebcd keys generate-terminals`, or unset [security] terminal_keys_dir"
        )
    return keys


def load_terminal_signers(directory: str | os.PathLike[str], codes: Iterable[str]) -> dict[str, Signer]:
    """code -> signer of each of `codes` that has a `<code>.key` in `directory` (the others sign
    nothing); KeyFileError for an unsafe or unreadable folder or key file."""
    directory = Path(directory)
    _check_dir(directory, "terminal private key folder")
    signers: dict[str, Signer] = {}
    for code in codes:
        path = directory / f"{code}{PRIVATE_SUFFIX}"
        if path.exists():
            signers[code] = load_signer(path, _scheme_of(path))
    return signers


def generate_terminal_keys(
    directory: str | os.PathLike[str], codes: Iterable[str], scheme: str, serial: int | str
) -> tuple[Path, Path]:
    """A new key pair per terminal: `<directory>/private/<code>.key` (0600, folder 0700) and
    `<directory>/public/<code>.pub` (0644); refuses, writing nothing, if any of them exists."""
    checked: Scheme = check_scheme(scheme)
    serial = key_serial(serial)
    directory = Path(directory)
    public_dir, private_dir = directory / PUBLIC_DIR, directory / PRIVATE_DIR
    wanted = list(dict.fromkeys(codes))
    for code in wanted:
        if not _CODE.fullmatch(code):
            raise ValueError(f"{code!r} is not a 23-digit terminal code")
        for path in (private_dir / f"{code}{PRIVATE_SUFFIX}", public_dir / f"{code}{PUBLIC_SUFFIX}"):
            if path.exists() or path.is_symlink():
                raise KeyFileError(f"{path} exists; refusing to overwrite a key: pick another --out")
    for folder, mode in ((private_dir, KEY_DIR_MODE), (public_dir, PUBLIC_DIR_MODE)):
        try:
            folder.mkdir(mode=mode, parents=True, exist_ok=True)
        except OSError as exc:
            raise KeyFileError(f"{folder}: cannot create the key folder: {exc.strerror}") from None
    for code in wanted:
        key: SigningKey = Sm2SigningKey.generate() if checked == "sm2" else Ed25519SigningKey.generate()
        write_new_key_file(private_dir / f"{code}{PRIVATE_SUFFIX}", key.file_text(serial), PRIVATE_KEY_MODE)
        public = key.public_key().file_text(serial)
        write_new_key_file(public_dir / f"{code}{PUBLIC_SUFFIX}", public, PUBLIC_KEY_MODE)
    return public_dir, private_dir


def _scheme_of(path: Path) -> Scheme:
    """A key file's scheme by its content: SM2 files are JSON, Ed25519 ones PEM."""
    try:
        head = read_checked(path, MAX_KEY_FILE_BYTES, lambda _st: None)  # load_* check it as they read
    except FileProblem as e:
        raise KeyFileError(f"{path}: cannot read the key file: {e.strerror or e.problem}") from None
    return "sm2" if head.lstrip().startswith(b"{") else "ed25519"


def _check_dir(directory: Path, what: str) -> None:
    """A folder of keys: not writable by group or others, who could put their own keys in it."""
    try:
        st = directory.stat()
    except OSError as exc:
        raise KeyFileError(f"{directory}: cannot open the {what}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise KeyFileError(f"{directory}: the {what} is not a folder")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o022:
        raise KeyFileError(
            f"{directory}: {what} has mode {mode:04o}, writable by group or others; "
            f"run `chmod go-w {directory}`"
        )
