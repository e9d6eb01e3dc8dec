"""Built-in synthetic demo dataset (see README.md)."""
