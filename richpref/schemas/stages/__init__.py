"""One module per stage whose config is its own profile section (the rest live in schemas/config.py)."""
