"""Data preparation: documents in files -> a memory-mapped token dataset (``ringattn prepare``)."""

from .prepare import PrepareConfig, prepare_dataset
from .tokenfile import TokenFile

__all__ = ["PrepareConfig", "TokenFile", "prepare_dataset"]
