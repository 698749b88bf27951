"""mixing package."""
