"""Data preparation: documents in files -> a memory-mapped token dataset (``ringattn prepare``)."""

from .prepare import PrepareConfig, prepare
from .tokenfile import TokenFile

__all__ = ["PrepareConfig", "TokenFile", "prepare"]
