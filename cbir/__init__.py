"""cbir: near-duplicate image retrieval for heritage collections of historical photographs."""

__version__ = "0.1.0"
