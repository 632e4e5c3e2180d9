"""The `richpref` command, one module per command family (the console script: richpref.cli.commands:main)."""
