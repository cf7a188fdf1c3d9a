"""Fault-injection scenarios through the real pipeline (`make chaos`), each ending in a ledger."""
