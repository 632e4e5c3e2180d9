"""Install requirements into a virtual environment with uv, resolving as this machine's pip would.

`make install` runs this. uv installs the same versions as pip in a quarter of the time (a fresh
`.[dev]` install here: 59 s against 241 s, bytecode compiled by both; docs/benchmarks.md), but uv does
not read pip's configuration. So pip's index URLs, find-links, constraints, certificate and timeout
are passed on to uv, and with several indexes uv weighs them all alike, as pip does. If uv cannot be
installed or fails, pip installs instead.

usage: python tools/install.py VENV_PYTHON REQUIREMENT_OR_PIP_ARG...
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

# pip's precedence, lowest first: config files' [global], then [install], then PIP_* environment variables.
SCOPES = ("global", "install", ":env:")
# pip setting -> uv option; the settings that hold several values separated by whitespace repeat the option.
LISTS = {"extra-index-url": "--extra-index-url", "find-links": "--find-links", "constraint": "--constraint"}


def pip_settings(listing: str) -> dict[str, str]:
    """The effective value of each setting in `pip config list` output (`scope.key='value'` per line)."""
    ranked: dict[str, tuple[int, str]] = {}
    for line in listing.splitlines():
        name, sep, raw = line.partition("=")
        scope, _, key = name.rpartition(".")
        if not sep or scope not in SCOPES:
            continue
        value = ast.literal_eval(raw) if raw[:1] in "'\"" else raw
        rank = SCOPES.index(scope)
        if key not in ranked or rank >= ranked[key][0]:
            ranked[key] = (rank, str(value))
    return {key: value for key, (_, value) in ranked.items()}


def uv_options(settings: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """uv's command-line options and environment for pip's settings."""
    args: list[str] = []
    env: dict[str, str] = {}
    if settings.get("index-url"):
        args += ["--index-url", settings["index-url"]]
    for key, option in LISTS.items():
        for value in settings.get(key, "").split():
            args += [option, value]
    if settings.get("extra-index-url"):
        # uv's default takes each package from the first index that has it; pip takes the best version of all.
        args += ["--index-strategy", "unsafe-best-match"]
    if settings.get("no-index", "").lower() in ("1", "true", "yes", "on"):
        args.append("--no-index")
    if settings.get("cert"):
        env["SSL_CERT_FILE"] = settings["cert"]
    if settings.get("default-timeout") or settings.get("timeout"):
        env["UV_HTTP_TIMEOUT"] = str(int(float(settings.get("default-timeout") or settings["timeout"])))
    return args, env


def install(python: str, requirements: list[str]) -> int:
    uv = Path(python).parent / "uv"
    listing = subprocess.run([python, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    args, env = uv_options(pip_settings(listing))
    got_uv = subprocess.run([python, "-m", "pip", "install", "-q", "uv>=0.5"]).returncode == 0
    if got_uv:
        done = subprocess.run([str(uv), "pip", "install", "-q", "--python", python, "--compile-bytecode", *args,
                               *requirements], env={**os.environ, **env})
        if done.returncode == 0:
            return 0
    print("note: uv could not install the requirements; installing with pip (slower)", file=sys.stderr)
    return subprocess.run([python, "-m", "pip", "install", "-q", *requirements]).returncode


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    sys.exit(install(sys.argv[1], sys.argv[2:]))
