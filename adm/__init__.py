"""The `adm` command and the typed-configuration helpers every package shares."""

__version__ = "0.1.0"
