"""Data checks at the site: exact counts on crafted files with each kind of problem, skip vs fail."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from flwr.app import Context, Message, MessageType, RecordDict

from fedtune.client.app import app as client_app
from fedtune.client.site import open_site
from fedtune.config import DataConfig, RunConfig
from fedtune.core.errors import DataError
from fedtune.data.loaders import load_checked
from fedtune.model.adapters import adapter_arrays, init_adapter, wrap_lora
from fedtune.model.loading import load_base
from fedtune.server.send import round_content
from fedtune.wire import keys

SECRET = "PATIENT-7781"  # content of bad lines: must never reach a report or an error message
A = {"instruction": "Convert 2 g to mg.", "input": "", "output": "2 g x 1000 = 2000 mg."}
B = {"instruction": "Convert 3 g to mg.", "input": "", "output": "3 g x 1000 = 3000 mg."}
C = {"instruction": "Convert 4 g to mg.", "input": "", "output": "4 g x 1000 = 4000 mg."}
LONG = {"instruction": "Convert " + " ".join(["5 g"] * 80) + " to mg.", "input": "", "output": "5000 mg."}


def crafted_jsonl(path: Path) -> Path:
    """2 empty, 4 malformed, 3 duplicates (2 extra A, 1 extra B), 1 too long, among 7 good records."""
    lines = [
        json.dumps(A),  # 1
        json.dumps(B),  # 2
        json.dumps({"instruction": "  ", "output": SECRET}),  # 3 empty instruction
        '{"instruction": "' + SECRET,  # 4 not valid JSON
        json.dumps(A),  # 5 duplicate
        "",  # 6 blank: not a record
        json.dumps({"instruction": SECRET, "output": None}),  # 7 empty output
        json.dumps([SECRET]),  # 8 not an object
        json.dumps({"instruction": SECRET}),  # 9 no output field
        json.dumps({"instruction": [SECRET], "output": "x"}),  # 10 a list, not text
        json.dumps(A),  # 11 duplicate
        json.dumps(B),  # 12 duplicate
        json.dumps(LONG),  # 13 too long
        json.dumps(C),  # 14
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_jsonl_checks_count_each_problem_with_its_line(tmp_path: Path) -> None:
    # Prepare
    path = crafted_jsonl(tmp_path / "site.jsonl")

    # Execute
    ds, report = load_checked(str(path), DataConfig())

    # Assert
    assert (report.records, report.malformed, report.empty) == (13, 4, 2)
    assert {p.line: p.kind for p in report.problems} == {
        3: "empty 'instruction'",
        4: "not valid JSON",
        7: "empty 'output'",
        8: "not a JSON object",
        9: "no field 'output'",
        10: "field 'instruction' is a list, not text",
    }
    assert len(ds) == 7  # skip (the default) drops the 6 bad records
    assert SECRET not in "\n".join(report.lines(128)) and SECRET not in json.dumps(ds.to_list())


def test_site_reports_duplicates_and_truncated_records_and_keeps_them(tiny_model: Path, tmp_path: Path) -> None:
    # Prepare
    path = crafted_jsonl(tmp_path / "site.jsonl")
    cfg = RunConfig.from_flat({"model.name": str(tiny_model), "data.max-seq-len": 48})

    # Execute
    site = open_site(cfg, {keys.DATA_PATH: str(path)})

    # Assert: the 7 good records are all used; the long one's prompt is cut to fit max-seq-len
    assert site.data_checks == {
        **{"malformed": 4, "empty": 2, "duplicates": 3, "too_long": 1},
        **{"prompts_cut": 1, "responses_too_long": 0},
    }
    assert len(site.train) + len(site.heldout) == 7
    assert max(len(e.input_ids) for e in site.train + site.heldout) == 48


def test_csv_checks_count_bad_rows_by_their_first_line(tmp_path: Path) -> None:
    # Prepare: a quoted field spanning lines 3-4 keeps the later line numbers exact
    path = tmp_path / "site.csv"
    path.write_text(
        "instruction,input,output\n"  # 1 header
        "Convert 2 g to mg.,,2000 mg.\n"  # 2
        '"Convert 3 g\nto mg.",,3000 mg.\n'  # 3-4 one record
        f",,{SECRET}\n"  # 5 empty instruction
        f"{SECRET},a,b,c\n"  # 6 four fields
        f"{SECRET}\n"  # 7 one field
        "\n"  # 8 blank
        "Convert 2 g to mg.,,2000 mg.\n"  # 9 duplicate (counted at the site)
    )

    # Execute
    ds, report = load_checked(str(path), DataConfig())

    # Assert
    assert {p.line: p.kind for p in report.problems} == {
        5: "empty 'instruction'",
        6: "4 fields where the header has 3",
        7: "1 fields where the header has 3",
    }
    assert (report.records, report.malformed, report.empty, len(ds)) == (6, 2, 1, 3)
    assert ds["instruction"][1] == "Convert 3 g\nto mg."


def test_fail_names_the_file_the_line_and_the_problem_never_the_content(tmp_path: Path) -> None:
    # Prepare
    path = crafted_jsonl(tmp_path / "site.jsonl")

    # Execute
    with pytest.raises(DataError) as caught:
        load_checked(str(path), DataConfig(on_bad_record="fail"), key="node config data-path")

    # Assert
    message = str(caught.value)
    assert message.startswith(f"`node config data-path`: {path} line 3: empty 'instruction' (and 5 more bad records)")
    assert "`data.on-bad-record` = fail" in message and SECRET not in message


def test_a_failing_site_replies_with_an_error_naming_file_and_line(
    tiny_model: Path, tmp_path: Path, task_identity: None
) -> None:
    # Prepare: the real ClientApp, a site pointing at the crafted file, `fail` in the round's spec
    path = crafted_jsonl(tmp_path / "site.jsonl")
    cfg = RunConfig.from_flat({"model.name": str(tiny_model), "data.on-bad-record": "fail"})
    model = wrap_lora(load_base(cfg.model, torch.device("cpu")), cfg.lora)
    init_adapter(model, cfg.seed)
    msg = Message(round_content(adapter_arrays(model), cfg, 1), dst_node_id=1, message_type=MessageType.TRAIN)
    context = Context(run_id=1, node_id=1, node_config={keys.DATA_PATH: str(path)}, state=RecordDict(), run_config={})

    # Execute
    reply = client_app(msg, context)

    # Assert
    assert reply.has_error()
    assert f"{path} line 3: empty 'instruction'" in reply.error.reason and SECRET not in reply.error.reason
