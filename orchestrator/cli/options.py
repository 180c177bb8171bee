"""The typer options every asking command takes. The quick path (`quick.py`) reads the same
options without typer; tests/unit/test_cli_quick.py holds both to the same names and types."""

from __future__ import annotations

import typer

SocketOption = typer.Option(None, "--socket", metavar="PATH", help="Control socket of the daemon.")
ConfigOption = typer.Option(None, "--config", metavar="FILE", help="Find the socket in this config.")
JsonOption = typer.Option(False, "--json", help="The documented JSON on stdout.")
