"""``data.truncation``: the response stays whole and the prompt is cut from the left (``prompt``), or
today's right cut (``right``); the same rule for evaluation prompts and generation. Real BPE tokenizer
of the tiny model, built offline; every expectation is recomputed from the tokenizer's own ids."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from fedtune.client.site import open_site
from fedtune.config import DataConfig, RunConfig
from fedtune.core.errors import DataError
from fedtune.data.prompts import IGNORE, prompt_ids, render_prompt, response_text, tokenize_counted
from fedtune.model.generation import generate_answers
from fedtune.model.loading import load_base, pick_device
from fedtune.model.sources import load_tokenizer
from fedtune.wire import keys

SHORT = {"instruction": "Convert 2 g to mg.", "input": "", "output": "2000 mg."}
LONG_PROMPT = {
    "instruction": "Case text: " + " ".join(f"clause {i} applies." for i in range(60)) + " Which option? A, B or C.",
    "input": "",
    "output": "B, because clause 59 applies.",
}
LONG_ANSWER = {"instruction": "Summarize.", "input": "", "output": " ".join(f"point {i}." for i in range(80))}


def _ids(tok: object, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])  # type: ignore[operator]


def test_prompt_truncation_keeps_the_response_whole_and_cuts_the_prompt_from_the_left(tiny_model: Path) -> None:
    # Prepare
    tok = load_tokenizer(str(tiny_model))
    cfg = DataConfig(max_seq_len=48)  # the default truncation: prompt
    prompt = _ids(tok, render_prompt(LONG_PROMPT, cfg, tok))
    answer = _ids(tok, response_text(LONG_PROMPT, cfg, tok))
    assert len(prompt) + len(answer) > 48 > len(answer)  # the case under test

    # Execute
    done = tokenize_counted([SHORT, LONG_PROMPT], cfg, tok)

    # Assert: the short one is untouched; the long one is the prompt's last tokens + the whole answer
    short, long = done.examples
    assert not short.truncated and long.truncated and len(long.input_ids) == 48
    assert long.input_ids == prompt[len(prompt) - (48 - len(answer)) :] + answer
    assert [t for t in long.labels if t != IGNORE] == answer
    assert tok.decode([t for t in long.labels if t != IGNORE]) == LONG_PROMPT["output"] + tok.eos_token
    assert (done.counts.too_long, done.counts.prompts_cut, done.counts.dropped) == (1, 1, 0)
    assert done.records == [SHORT, LONG_PROMPT]


def test_an_example_whose_response_alone_exceeds_the_limit_is_dropped_and_counted(tiny_model: Path) -> None:
    # Prepare
    tok = load_tokenizer(str(tiny_model))
    cfg = DataConfig(max_seq_len=48)
    assert len(_ids(tok, response_text(LONG_ANSWER, cfg, tok))) > 48

    # Execute
    done = tokenize_counted([LONG_ANSWER, SHORT, LONG_PROMPT], cfg, tok)

    # Assert: only the over-long response is dropped; records stay aligned with the examples
    assert len(done.examples) == 2 and done.records == [SHORT, LONG_PROMPT]
    counts = done.counts
    assert (counts.too_long, counts.prompts_cut, counts.responses_too_long, counts.dropped) == (2, 1, 1, 1)


def test_right_truncation_is_the_old_behaviour(tiny_model: Path) -> None:
    # Prepare
    tok = load_tokenizer(str(tiny_model))
    cfg = DataConfig(max_seq_len=48, truncation="right")
    expected = []
    for record in (LONG_PROMPT, LONG_ANSWER):
        prompt, answer = _ids(tok, render_prompt(record, cfg, tok)), _ids(tok, response_text(record, cfg, tok))
        expected.append(((prompt + answer)[:48], ([IGNORE] * len(prompt) + answer)[:48]))

    # Execute
    done = tokenize_counted([LONG_PROMPT, LONG_ANSWER], cfg, tok)

    # Assert: both kept, cut from the right (the long-prompt one loses its whole response)
    assert [(e.input_ids, e.labels) for e in done.examples] == expected
    assert all(t == IGNORE for t in done.examples[0].labels)
    assert (done.counts.too_long, done.counts.prompts_cut, done.counts.dropped) == (2, 0, 0)


def test_generation_prompts_keep_their_end_under_prompt_truncation(tiny_model: Path) -> None:
    # Prepare
    tok = load_tokenizer(str(tiny_model))
    full = _ids(tok, render_prompt(LONG_PROMPT, DataConfig(), tok))
    assert len(full) > 48 - 16

    # Execute
    cut = prompt_ids(LONG_PROMPT, DataConfig(max_seq_len=48), tok, max_new_tokens=16)
    kept = prompt_ids(LONG_PROMPT, DataConfig(max_seq_len=48, truncation="right"), tok, max_new_tokens=16)
    short = prompt_ids(SHORT, DataConfig(max_seq_len=48), tok, max_new_tokens=16)

    # Assert: the last max-seq-len - max-new-tokens tokens (the assistant header stays); right: whole
    assert cut == full[-32:] and kept == full
    assert short == _ids(tok, render_prompt(SHORT, DataConfig(), tok))


def test_batched_generation_answers_from_the_cut_prompt(tiny_model: Path) -> None:
    # Prepare: the reference answers each prompt alone, from the ids prompt_ids gives
    cfg = RunConfig.from_flat({"model.name": str(tiny_model), "data.max-seq-len": 48})
    loaded = load_base(cfg.model, pick_device("cpu"))
    tok, model = loaded.tokenizer, loaded.model
    records = [LONG_PROMPT, SHORT]
    reference = []
    for record in records:
        ids = torch.tensor([prompt_ids(record, cfg.data, tok, 6)])
        out = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
        reference.append(tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip())

    # Execute
    answers = generate_answers(model, tok, records, cfg.data, max_new_tokens=6, batch_size=2)

    # Assert
    assert answers == reference


def test_a_site_reports_cut_prompts_and_dropped_responses(
    tiny_model: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: 6 short, 2 long prompts, 2 over-long responses
    path = tmp_path / "site.jsonl"
    rows = [SHORT] * 6 + [LONG_PROMPT] * 2 + [LONG_ANSWER] * 2
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = RunConfig.from_flat({"model.name": str(tiny_model), "data.max-seq-len": 48, "seed": 3})

    # Execute
    with caplog.at_level(logging.INFO):
        site = open_site(cfg, {keys.DATA_PATH: str(path)})

    # Assert: the counts and the log line name how many were cut and dropped; 8 examples remain
    checks = site.data_checks
    assert (checks["too_long"], checks["prompts_cut"], checks["responses_too_long"]) == (4, 2, 2)
    assert len(site.train) + len(site.heldout) == 8 == len(rows) - 2
    assert len(site.heldout) == len(site.heldout_records)
    assert "2 prompts cut from the left, 2 responses alone longer than the limit dropped" in caplog.text


def test_a_site_whose_every_response_is_too_long_is_refused_in_one_line(tiny_model: Path, tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "site.jsonl"
    path.write_text("\n".join(json.dumps(LONG_ANSWER | {"instruction": f"Summarize {i}."}) for i in range(5)) + "\n")
    cfg = RunConfig.from_flat({"model.name": str(tiny_model), "data.max-seq-len": 48})

    # Execute / Assert
    with pytest.raises(DataError, match=r"response alone is longer than `data.max-seq-len` = 48"):
        open_site(cfg, {keys.DATA_PATH: str(path)})
