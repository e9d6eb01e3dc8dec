"""Instruction data: file and hub loaders, prompt formats with response-only labels, partitioners."""
