"""Local federations on one machine: presets and Flower's simulation engine."""
