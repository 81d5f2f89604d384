"""The `fundus-sdk` command line: a thin layer over the Python API for clinic IT and scripts.

Exit status (fundus_sdk.errors.Exit): 0 everything succeeded; 1 some inputs failed (each named
on stderr, the rest processed); 2 usage error; 3 fatal error (missing index or model, model
mismatch, ...); 130 interrupted (an index keeps its last committed state).

Each command group is a module of this package; each parses its arguments, calls the library
and prints what it returns.
"""

from __future__ import annotations

import click

from .. import __version__
from .embed import embed
from .index import index
from .info import info
from .intake import intake
from .search import evaluate, search
from .serve import keys, serve


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, epilog=__doc__.split("\n\n")[1])
@click.version_option(__version__, prog_name="fundus-sdk")
def main() -> None:
    """Retrieve similar graded fundus photographs: embed photos, build case indexes, search them.

    \b
    Example:
      fundus-sdk index create cases/
      fundus-sdk index add cases/ photos/ --labels grades.csv
      fundus-sdk search new_photo.jpg --index cases/ -k 5
    """


for command in (embed, index, search, evaluate, info, serve, keys, intake):
    main.add_command(command)
