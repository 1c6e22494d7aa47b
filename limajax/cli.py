"""The `limajax` command line. Each command parses its options, builds a config and calls one
library function; user mistakes (UserError) become one line on stderr and exit code 2."""

from __future__ import annotations

import functools
import sys

import click

from limajax.errors import UserError


def user_errors(fn):
    """Turn a UserError into `error: ...` and exit code 2 (DESIGN §3); anything else is a bug."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="limajax")
def main():
    """limajax: LIMA (Less Is More for Alignment) in JAX.

    Convert LLaMA weights, prepare LIMA's dialogues, fine-tune on a device mesh, sample, and
    compare models pairwise.
    """


# --- commands are added below, one section per capability -------------------------------------
