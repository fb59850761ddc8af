"""`edgeweave keygen`: a cluster key; and the `--key` option that run, worker and serve share."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from edgeweave.cli.common import console, emit_json, JsonOpt

KeyOpt = typer.Option(None, "--key", envvar="EDGEWEAVE_KEY_FILE", show_envvar=True,
                      help="Cluster key file (`edgeweave keygen FILE`): followers must prove they hold it, and "
                           "control messages are authenticated with it. Without one the cluster runs on loopback "
                           "only (local --workers clusters use a fresh key of their own).")


def use_key(path: Optional[Path], listen: Optional[str] = None) -> Optional[bytes]:
    """Load the key (a user error if unreadable or open to others) and make it the one the
    runtime's sessions use (``EDGEWEAVE_KEY_FILE``). With ``listen`` (a leader waiting for
    followers started by hand), refuse a non-loopback address when there is no key, before
    anything slow happens."""
    from edgeweave.runtime import auth
    from edgeweave.limits import parse_address

    key = auth.load_key(path) if path is not None else None
    if path is not None:
        os.environ[auth.KEY_ENV] = str(path)
    if listen is not None:
        auth.require_key_or_loopback(parse_address(listen)[0], key, "leader")
    return key


def keygen(
    path: Path = typer.Argument(..., help="Where to write the key (created with mode 0600)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing key file (rotation: every device then "
                               "needs the new file)."),
    json_out: Optional[str] = JsonOpt,
) -> None:
    """Write a new random cluster key. Copy it to every device over a channel you trust (scp),
    then give it to the leader and every follower with --key FILE."""
    from edgeweave.runtime import auth

    key = auth.generate_key()
    auth.write_key(path, key, force=force)
    fp = auth.fingerprint(key)
    console.print(f"wrote a {8 * len(key)}-bit cluster key to {path} (mode 0600), fingerprint {fp}; copy it to every "
                  f"device of the cluster and start the leader and the followers with --key {path}")
    emit_json({"path": str(path), "fingerprint": fp, "bits": 8 * len(key)}, json_out)


def register(app: typer.Typer) -> None:
    app.command()(keygen)
