"""`python -m fundus_sdk ...`: the same as the `fundus-sdk` command."""
from .cli import main

main(prog_name="fundus-sdk")
