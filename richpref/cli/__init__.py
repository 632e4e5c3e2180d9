"""The `richpref` command, one module per command family."""
from richpref.cli.commands import main  # noqa: F401 - the console script richpref.cli:main
