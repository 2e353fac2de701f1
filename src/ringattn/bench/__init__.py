"""Benchmarks behind ``ringattn bench``: JSON lines plus a readable table."""
