"""The `edgeweave` command: one Typer app; every subcommand is a thin wrapper over a library call.

Each area registers its commands in its own module (``cli/<area>.py``) with ``register(app)``;
this file only lists them and turns user errors into one-line messages with exit code 2.
"""

from __future__ import annotations

import sys

import typer

from edgeweave.errors import EdgeweaveError

app = typer.Typer(
    name="edgeweave",
    help="Fast, on-demand deep-learning inference on clusters of edge devices.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Modules that define commands; each has register(app).
_COMMAND_MODULES = [
    "edgeweave.cli.train",
    "edgeweave.cli.demo",
    "edgeweave.cli.compress",
    "edgeweave.cli.run",
    "edgeweave.cli.serve",
    "edgeweave.cli.plan",
    "edgeweave.cli.profile",
    "edgeweave.cli.testbed",
    "edgeweave.cli.distill",
    "edgeweave.cli.exits",
    "edgeweave.cli.bench",
    "edgeweave.cli.keygen",
]


def _register_all() -> None:
    import importlib

    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(app)


_register_all()


def main(argv: list[str] | None = None) -> None:
    from edgeweave.cli.common import normalize_json_flag

    args = normalize_json_flag(list(sys.argv[1:] if argv is None else argv))
    try:
        app(args=args, prog_name="edgeweave", standalone_mode=True)
    except EdgeweaveError as e:  # pragma: no cover - exercised through subprocess tests
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
