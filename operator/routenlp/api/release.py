"""The release (not the API version, `common.VERSION`), read from one place: the installed distribution's metadata (pyproject.toml's `version`)."""

from __future__ import annotations

from importlib import metadata

try:
    RELEASE = metadata.version("routenlp")
except metadata.PackageNotFoundError:  # running from a source tree that was never installed
    RELEASE = "0.0.0+unknown"
