"""Prefect tasks: thin wrappers around cbir library calls (retries, logging, caching)."""
