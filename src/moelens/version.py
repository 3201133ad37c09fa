"""The package's version: declared once, in pyproject.toml, and read from the installed
distribution's metadata (importlib.metadata), so no module repeats the number."""

from __future__ import annotations

#: What a source tree that was never installed (``PYTHONPATH=src``) reports.
UNINSTALLED = "0+unknown"


def package_version(distribution: str = "moelens") -> str:
    """The installed version of ``distribution`` (moelens by default)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return UNINSTALLED


__all__ = ["UNINSTALLED", "package_version"]
