"""Local federations on one machine: Flower's simulation engine and the in-process `shared` backend."""
