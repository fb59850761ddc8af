"""The cluster key: who may join a cluster, and which control values to believe.

Standard library only (``hmac``, ``hashlib``, ``secrets``); nothing is ever unpickled.

- **The key** is 32 random bytes, written by ``edgeweave keygen`` as hex in a file of mode 0600
  and given to the leader and every follower (``--key FILE`` or ``EDGEWEAVE_KEY_FILE``).
  Without a key a cluster runs on loopback only (:func:`require_key_or_loopback`).
- **Membership** (``rendezvous.join`` / ``rendezvous.Gate``): a follower registers with a fresh
  nonce; the leader answers with a challenge (its own nonce and a session id, MAC'd over both
  nonces, the follower's name and ticket, so the follower knows the leader holds the key too);
  the follower answers with a MAC over the same values. Only then does the leader give it a rank.
- **Control** (:class:`Control`): every value the leader or a follower writes to the store
  (generations, commands, aborts, acknowledgements, failure reports) is sealed: a MAC over the
  session id, the key's name in the store, the writer, the writer's sequence number and the JSON
  payload. A value copied to another key, from another session or from another writer fails the
  check; so does a command older than one already read (the sequence number). Readers ignore such
  a value and log it. The model's hash never travels in the clear: the leader sends a keyed tag.

What it does not protect: the tensors (inputs, strips, the model's bytes) travel over gloo
unencrypted; see docs/security.md.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import os
import secrets
import socket
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from edgeweave.errors import EdgeweaveError

KEY_ENV = "EDGEWEAVE_KEY_FILE"  # where a key file is found when --key is not given
KEY_BYTES = 32
MIN_KEY_BYTES = 16
_DOMAIN = b"edgeweave/1\0"


class Forged(Exception):
    """A control value that fails the check (its ``args[0]`` says why)."""


# -- the key ---------------------------------------------------------------------------------

def generate_key() -> bytes:
    return secrets.token_bytes(KEY_BYTES)


def fingerprint(key: bytes | None) -> str:
    """A short public name of a key (to tell two keys apart in logs; it reveals nothing of it)."""
    if key is None:
        return "none"
    return hashlib.sha256(_DOMAIN + b"fingerprint\0" + key).hexdigest()[:16]


def write_key(path: str | Path, key: bytes | None = None, force: bool = False) -> Path:
    """Write ``key`` (default: a new random one) as hex to ``path``, created with mode 0600."""
    path = Path(path)
    if not path.parent.is_dir():
        raise EdgeweaveError(f"folder {path.parent} does not exist")
    if path.exists() and not force:
        raise EdgeweaveError(f"{path} exists; give --force to replace it (every device then needs the new key)")
    key = generate_key() if key is None else key
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (0 if force else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as e:
        raise EdgeweaveError(f"cannot write {path}: {e.strerror or e}") from None
    with os.fdopen(fd, "w") as fh:
        os.fchmod(fh.fileno(), 0o600)  # an existing file (--force) keeps its mode otherwise
        fh.write(key.hex() + "\n")
    return path


def load_key(path: str | Path) -> bytes:
    """The key in ``path``; refused when others may read the file, or it holds no key."""
    path = Path(path)
    try:
        st = path.stat()
        text = path.read_text(encoding="ascii", errors="replace").strip()
    except OSError as e:
        raise EdgeweaveError(f"cannot read the key file {path}: {e.strerror or e}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise EdgeweaveError(f"the key file {path} is open to other users (mode {stat.S_IMODE(st.st_mode):04o}): "
                             f"chmod 600 {path}")
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) < MIN_KEY_BYTES:
        raise EdgeweaveError(f"{path} holds no cluster key (expected at least {2 * MIN_KEY_BYTES} hex digits, as "
                             f"`edgeweave keygen` writes)")
    return key


def key_from_env() -> bytes | None:
    """The key of the file ``EDGEWEAVE_KEY_FILE`` names, or None when it is not set."""
    p = os.environ.get(KEY_ENV)
    return load_key(p) if p else None


def is_loopback(host: str) -> bool:
    """Whether every address ``host`` names is this machine's loopback ("0.0.0.0" is not)."""
    h = host.strip("[]")
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(h, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0].split("%")[0]).is_loopback for i in infos)


def require_key_or_loopback(host: str, key: bytes | None, role: str) -> None:
    """Without a key a cluster runs on loopback only: anyone who reaches a leader's port could
    otherwise join, be sent the model and command the cluster."""
    if key is None and not is_loopback(host):
        if role == "leader":
            raise EdgeweaveError(f"without a cluster key the leader listens on loopback only, not {host}: anyone who "
                                 f"reaches it could join, take the model and command the cluster; make a key with "
                                 f"`edgeweave keygen FILE` and give --key FILE (to the followers too)")
        raise EdgeweaveError(f"without a cluster key a follower joins a leader on this machine only, not {host}; "
                             f"give --key FILE (the leader's key)")


# -- MACs ------------------------------------------------------------------------------------

def _mac(key: bytes, label: str, *parts: str | bytes) -> str:
    """HMAC-SHA256 over a label and length-prefixed parts (no two inputs share an encoding)."""
    h = hmac.new(key, _DOMAIN + label.encode() + b"\0", hashlib.sha256)
    for p in parts:
        b = p.encode() if isinstance(p, str) else p
        h.update(len(b).to_bytes(8, "big"))
        h.update(b)
    return h.hexdigest()


def challenge_mac(key: bytes, session: str, ticket: int, name: str, follower_nonce: str, leader_nonce: str) -> str:
    """What the leader's challenge carries: proves the leader holds the key, to this follower's nonce."""
    return _mac(key, "challenge", session, str(ticket), name, follower_nonce, leader_nonce)


def response_mac(key: bytes, session: str, ticket: int, name: str, follower_nonce: str, leader_nonce: str) -> str:
    """What the follower answers: proves it holds the key, to the leader's fresh nonce."""
    return _mac(key, "response", session, str(ticket), name, follower_nonce, leader_nonce)


def new_nonce() -> str:
    return secrets.token_hex(16)


def equal(a: Any, b: Any) -> bool:
    return isinstance(a, str) and isinstance(b, str) and hmac.compare_digest(a.encode(), b.encode())


class Control:
    """Seals the values one process writes to the store and checks the ones it reads.

    A sealed value is ``MAC "\\n" BODY`` where BODY is the JSON ``[writer, seq, payload]`` and the
    MAC (HMAC-SHA256 with the cluster key) covers the session id, the value's name in the store
    and BODY. Without a key the MAC is ``-`` and nothing is checked (a loopback-only cluster).

    ``log`` receives one line per distinct value that fails a check; ``forged`` counts them.
    """

    def __init__(self, key: bytes | None, writer: str = "", session: str = "",
                 log: Callable[[str], None] | None = None):
        self.key, self.writer, self.session = key, writer, session
        self.log = log or (lambda _m: None)
        self.forged = 0
        self._seq = 0
        self._seq_lock = threading.Lock()  # groups of devices serve frames from threads of the leader
        self._floor: dict[str, int] = {}  # writer -> the last sequence number read in order
        self._bad: set[bytes] = set()  # digests of (name, value) already logged (a reader polls them again)

    @property
    def keyed(self) -> bool:
        return self.key is not None

    def tag(self, label: str, data: str | bytes) -> str:
        """A keyed digest of ``data``: equal for equal data under one key, and says nothing about
        ``data`` to whoever lacks the key (a model's hash, its bytes). Without a key: SHA-256."""
        if self.key is None:
            h = hashlib.sha256(label.encode() + b"\0")
            h.update(data.encode() if isinstance(data, str) else data)
            return h.hexdigest()
        return _mac(self.key, "tag:" + label, data)

    def tag_file(self, label: str, f: BinaryIO) -> str:
        """:meth:`tag` of an open file's bytes from its start, read in pieces (equal to
        ``tag(label, bytes)``)."""
        size = os.fstat(f.fileno()).st_size
        f.seek(0)
        if self.key is None:
            h = hashlib.sha256(label.encode() + b"\0")
        else:
            h = hmac.new(self.key, _DOMAIN + b"tag:" + label.encode() + b"\0", hashlib.sha256)
            h.update(size.to_bytes(8, "big"))
        while piece := f.read(1 << 22):
            h.update(piece)
        return h.hexdigest()

    def seal(self, name: str, payload: Any) -> str:
        with self._seq_lock:
            self._seq += 1
            seq = self._seq
        body = json.dumps([self.writer, seq, payload], separators=(",", ":"))
        mac = _mac(self.key, "control", self.session, name, body) if self.key is not None else "-"
        return f"{mac}\n{body}"

    def open(self, name: str, raw: bytes | str, *, writer: str | None = None, ordered: bool = False) -> Any:
        """The payload of the value read at ``name``; raises :class:`Forged` when its MAC, writer or
        (``ordered``: values this reader reads in the order they were written, such as a
        generation's commands) sequence number fails the check."""
        text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
        mac, sep, body = text.partition("\n")
        if not sep:
            raise Forged("not a sealed value")
        if self.key is not None and not equal(mac, _mac(self.key, "control", self.session, name, body)):
            raise Forged("its MAC does not verify (no key, another key, or copied from another key or session)")
        try:
            w, seq, payload = json.loads(body)
            seq = int(seq)
        except (ValueError, TypeError):
            raise Forged("malformed") from None
        if writer is not None and w != writer:
            raise Forged(f"written by {w!r}, expected {writer!r}")
        if ordered:
            if seq <= self._floor.get(str(w), 0):
                raise Forged(f"replayed (sequence {seq}, already read {self._floor[str(w)]})")
            self._floor[str(w)] = seq
        return payload

    def check(self, name: str, raw: bytes | str, *, writer: str | None = None, ordered: bool = False) -> Any:
        """:meth:`open`, or None (logged once, counted) when the value fails the check."""
        try:
            return self.open(name, raw, writer=writer, ordered=ordered)
        except Forged as e:
            self.refuse(name, raw, str(e))
            return None

    def refuse(self, name: str, raw: bytes | str, why: str) -> None:
        digest = hashlib.sha256(name.encode() + b"\0" + (raw.encode() if isinstance(raw, str) else raw)).digest()
        if digest in self._bad:
            return
        if len(self._bad) > 4096:
            self._bad.clear()
        self._bad.add(digest)
        self.forged += 1
        self.log(f"ignored the control value at {name}: {why}")

    @staticmethod
    def peek(raw: bytes | str) -> Any:
        """The payload of a value without any check (to say why a refused follower was refused)."""
        text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
        try:
            return json.loads(text.partition("\n")[2])[2]
        except (ValueError, TypeError, IndexError):
            return None
