"""Task metrics against hand-computed SQuAD v1.1 values, rouge-score's own scorer and a hand LCS."""

from __future__ import annotations

import pytest
from rouge_score import rouge_scorer

from fedtune.config import RunConfig
from fedtune.core.errors import ConfigError
from fedtune.model.task_metrics import exact_match, normalize_answer, rouge_l, score, token_f1
from fedtune.privacy import compat


def test_normalization_follows_squad_v1_1() -> None:
    # Lower case, punctuation gone, whole-word articles gone, whitespace collapsed.
    assert normalize_answer("  The  Eiffel Tower! ") == "eiffel tower"
    assert normalize_answer("An apple, a pear") == "apple pear"
    assert normalize_answer("Theater.") == "theater"  # "the" inside a word stays
    assert normalize_answer("1.5 mg/kg") == "15 mgkg"  # punctuation inside numbers goes too, as in SQuAD


def test_exact_match_on_fixed_strings() -> None:
    assert exact_match("The Eiffel Tower!", "eiffel tower") == 1.0
    assert exact_match("Dose = 80 mg.", "dose 80 mg") == 1.0
    assert exact_match("80 mg", "800 mg") == 0.0


@pytest.mark.parametrize(
    ("prediction", "reference", "same", "n_pred", "n_ref"),
    [
        # pred tokens [80, mg, per, dose], ref [dose, 80, mg]: 3 shared
        ("80 mg per dose", "Dose = 80 mg.", 3, 4, 3),
        # pred [cat, cat, cat] ("a" dropped), ref [cat, sat]: the multiset shares one "cat"
        ("a cat cat cat", "the cat sat", 1, 3, 2),
        # pred [infuse, 125, mlh], ref [rate, 500, ml, 4, h, 125, mlh]: 2 shared
        ("Infuse 125 mL/h", "Rate = 500 mL / 4 h = 125 mL/h.", 2, 3, 7),
    ],
)
def test_token_f1_is_the_squad_harmonic_mean(
    prediction: str, reference: str, same: int, n_pred: int, n_ref: int
) -> None:
    # Prepare: precision and recall over the shared tokens, counted by hand
    precision, recall = same / n_pred, same / n_ref

    # Execute
    f1 = token_f1(prediction, reference)

    # Assert
    assert f1 == pytest.approx(2 * precision * recall / (precision + recall))


def test_token_f1_without_shared_tokens_is_zero_even_for_two_empty_strings() -> None:
    assert token_f1("forty", "80 mg") == 0.0
    assert token_f1("", "") == 0.0  # SQuAD v1.1: no shared token scores 0
    assert token_f1("the", "a") == 0.0  # both normalize to nothing


def test_rouge_l_matches_a_hand_computed_lcs() -> None:
    # Prepare: reference "a b c d e", prediction "a c e f": the LCS is "a c e" (3 tokens)
    lcs, n_pred, n_ref = 3, 4, 5
    precision, recall = lcs / n_pred, lcs / n_ref

    # Execute
    value = rouge_l("A c, e f", "a b c d e")

    # Assert
    assert value == pytest.approx(2 * precision * recall / (precision + recall))


@pytest.mark.parametrize(
    ("prediction", "reference"),
    [
        ("Dose = 2.5 mg/kg x 79 kg = 197.5 mg.", "Dose = 2.5 mg/kg x 79 kg = 197.5 mg."),
        ("The dose is 197.5 mg", "Dose = 2.5 mg/kg x 79 kg = 197.5 mg."),
        ("the cat sat on the mat", "the cat is on a mat"),
        ("", "anything"),
    ],
)
def test_rouge_l_equals_rouge_score_reference_scorer(prediction: str, reference: str) -> None:
    # Prepare: Google's scorer, built here independently of fedtune
    reference_scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)

    # Execute
    ours = rouge_l(prediction, reference)

    # Assert
    assert ours == pytest.approx(reference_scorer.score(reference, prediction)["rougeL"].fmeasure)


def test_accuracy_compares_normalized_answers_with_labels_and_skips_unlabelled_records() -> None:
    # Prepare: 3 labelled records, of which answers 1 and 4 match their label once normalized
    predictions = ["positive.", "Positive", "whatever", "(B)"]
    references = ["x", "x", "x", "x"]
    labels = ["Positive", "negative", None, "B"]

    # Execute
    result = score(["accuracy"], predictions, references, labels)

    # Assert
    assert result == {"accuracy": pytest.approx(2 / 3)}
    assert score(["accuracy"], ["a"], ["a"], [None]) == {}  # no labels: no accuracy


def test_corpus_scores_are_means_over_examples_and_loss_is_not_a_generated_metric() -> None:
    # Prepare
    predictions, references = ["80 mg", "a cat cat cat"], ["80 mg", "the cat sat"]

    # Execute
    result = score(["loss", "exact-match", "f1"], predictions, references, [None, None])

    # Assert: example 1 matches exactly; example 2 has F1 2 * 1/3 * 1/2 / (1/3 + 1/2) = 0.4
    assert set(result) == {"exact-match", "f1"}
    assert result["exact-match"] == pytest.approx((1 + 0) / 2)
    assert result["f1"] == pytest.approx((1 + 2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2)) / 2)


def test_unknown_metric_names_every_known_one() -> None:
    with pytest.raises(ConfigError, match=r"`eval.metrics` has unknown metric\(s\) 'bleu'; known: loss, exact-match"):
        RunConfig.from_flat({"eval.metrics": "loss, bleu"})


def test_accuracy_needs_a_label_field() -> None:
    with pytest.raises(ConfigError, match=r"`eval.metrics` = accuracy needs `data.label-field`"):
        compat.check_round(RunConfig.from_flat({"eval.metrics": "accuracy"}))
    assert RunConfig.from_flat({"eval.metrics": "accuracy", "data.label-field": "label"}).eval.metric_names() == [
        "accuracy"
    ]
