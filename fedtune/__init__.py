"""fedtune: federated fine-tuning of LLM adapters on Flower."""

__version__ = "0.1.0"
