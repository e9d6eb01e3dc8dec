"""The names ``fedtune export`` / ``chat`` read in a run directory are the ones the server writes."""

from __future__ import annotations

from fedtune.model import card, finished
from fedtune.server import outputs
from fedtune.server.report import files


def test_run_file_names_match_the_server_outputs() -> None:
    # Assert: the model layer cannot import the server, so it repeats these names; they must agree
    assert finished.ADAPTER_DIR == outputs.ADAPTER_DIR
    assert finished.MODEL_DIR == outputs.MODEL_DIR
    assert finished.SUMMARY_FILE == files.SUMMARY_FILE
    assert finished.METRICS_FILE == files.METRICS_FILE


def test_only_owner_slash_name_counts_as_a_hub_id() -> None:
    # Assert
    assert card.is_hub_id("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert not card.is_hub_id("/tmp/run/base-model")
    assert not card.is_hub_id("./base-model")
    assert not card.is_hub_id("gpt2")
