"""The one stderr console and progress-bar factory, shared by library and CLI code.

Library modules import this (never ``edgeweave.cli``, which builds the whole app) so that
stdout stays free for the JSON the contract promises.
"""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

console = Console(stderr=True)


def progress_bar(enabled: bool = True, transient: bool = False) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, disable=not enabled, transient=transient)
