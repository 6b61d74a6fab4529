"""The error boundary of every command: one message and exit status 2, never a traceback."""

from __future__ import annotations

import os

import click

from pipeline.errors import explain
from pipeline.redact import scrub_message


class KDGroup(click.Group):
    """Prints every failure as one clear message (exit 2) instead of a traceback.

    Library errors are printed as they are; storage and OS failures get their message from
    ``pipeline.errors.explain``; anything else is a bug, said so in one line (set
    KD_TRACEBACK=1 to see the traceback instead).
    """

    def invoke(self, ctx: click.Context):  # noqa: ANN201 - click's signature
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.Abort):
            raise  # click's own: usage errors, ctx.exit(), Ctrl-C
        except Exception as e:
            err = explain(e)
            if err is None and os.environ.get("KD_TRACEBACK"):
                raise
            # The one redaction rule: no credential, no advice to unpickle a refused file.
            click.echo(f"error: {scrub_message(str(err or _bug(e)))}", err=True)
            ctx.exit(2)


def _bug(e: Exception) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return (
        f"internal error ({type(e).__name__}: {first}); this is a bug in kd-pipeline: "
        "please report it with the command you ran (KD_TRACEBACK=1 shows the traceback)"
    )
