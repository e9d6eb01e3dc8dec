"""The lowest layer: errors, registries, logging, paths, array types and atomic writes."""
