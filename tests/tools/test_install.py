"""tools/install.py: pip's effective settings and the uv options that resolve alike."""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

import install  # noqa: E402

# `pip config list` as this machine prints it: a config file's [global] and PIP_* variables.
LISTING = """\
global.cert='/etc/ssl/certs/ca-certificates.crt'
global.constraint='/etc/xdg/pip/constraints.txt'
global.extra-index-url='file:///opt/pypi/simple file:///opt/pypi-more/simple'
global.find-links='/opt/wheels'
global.timeout='60'
install.timeout='90'
:env:.cert='/etc/ssl/certs/ca-certificates.crt'
:env:.default-timeout='180'
:env:.disable-pip-version-check='1'
:env:.find-links='/opt/wheels /opt/more-wheels'
"""


def test_the_environment_outranks_install_which_outranks_global():
    settings = install.pip_settings(LISTING)
    assert settings["find-links"] == "/opt/wheels /opt/more-wheels"
    assert settings["timeout"] == "90"
    assert settings["extra-index-url"] == "file:///opt/pypi/simple file:///opt/pypi-more/simple"
    assert install.pip_settings("global.index-url='https://a/simple'\n:env:.index-url='https://b/simple'") == {
        "index-url": "https://b/simple"}
    assert install.pip_settings("") == {}
    assert install.pip_settings("not a setting\nuser.x='y'") == {}


def test_uv_gets_every_index_find_links_and_constraint_and_weighs_the_indexes_alike():
    args, env = install.uv_options(install.pip_settings(LISTING))
    assert args == ["--extra-index-url", "file:///opt/pypi/simple", "--extra-index-url", "file:///opt/pypi-more/simple",
                    "--find-links", "/opt/wheels", "--find-links", "/opt/more-wheels",
                    "--constraint", "/etc/xdg/pip/constraints.txt", "--index-strategy", "unsafe-best-match"]
    assert env == {"SSL_CERT_FILE": "/etc/ssl/certs/ca-certificates.crt", "UV_HTTP_TIMEOUT": "180"}


def test_one_index_keeps_uvs_default_strategy_and_no_index_is_passed_on():
    args, env = install.uv_options({"index-url": "https://mirror/simple", "no-index": "true"})
    assert args == ["--index-url", "https://mirror/simple", "--no-index"]
    assert env == {}
    assert install.uv_options({}) == ([], {})
