"""The ``cdc`` command line: config + flags → a pipeline; errors → one line and an exit code.

The commands live by what they work on: ``capture`` (stream, snapshot, resync, check,
slot) and ``lake`` (status, compact, maintain, query, ddl); ``options`` holds the apps and
the options they share.
"""

from __future__ import annotations

import gc
import sys
from typing import Annotated

import typer

from cdc import __version__
from cdc.cli import capture, lake  # noqa: F401  (registers the commands, in this order)
from cdc.cli.options import app
from cdc.errors import CdcError
from cdc.log import scrub


def _version(value: bool) -> None:
    if value:
        typer.echo(f"cdc {__version__}")
        raise typer.Exit


@app.callback()
def _main(version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True, help="Show the version and exit")] = False,
          ) -> None:
    pass


def main() -> None:
    try:
        app()
    except CdcError as exc:
        for line in scrub(str(exc)).splitlines() or [""]:
            print(f"cdc: error: {line}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print("cdc: interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        # the process ends here: without this the interpreter's teardown collects every
        # module's objects, 0.1-0.3 s of CPU after a snapshot is done (docs/benchmarks.md)
        gc.freeze()
