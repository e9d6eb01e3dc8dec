"""Base models (hub id, path, GGUF), PEFT methods, hardware placement, adapter I/O and scoring."""
