"""Streaming codec: a reader that yields records with byte offsets, a writer that takes them."""
