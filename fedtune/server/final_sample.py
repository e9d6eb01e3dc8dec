"""The run's closing sample: the base model's and the final adapter's answers to one held-out prompt
(``summary.json``'s ``sample``), with a progress bar over the tokens generated.

Generating them took SmolLM2 50-105 s after the last round, with nothing on the screen. When the sites
run in other processes (Ray, deployment), the round loop starts them right after the last round's
centralized evaluation (:meth:`FinalSample.start`), so they overlap with the sites' federated
evaluation; the server's model is the server's alone then. The caller waits (:meth:`FinalSample.wait`)
before anything else uses the model (a checkpoint, the final adapter). When the sites share the
server's process, or the run stops before its last planned round, they are generated at the end.
"""

from __future__ import annotations

import logging
import sys
import threading
from typing import Any

import numpy as np
from tqdm import tqdm

from fedtune.core.arrays import Arrays
from fedtune.server.evaluation import CentralEvaluator

log = logging.getLogger(__name__)

DESC = "sample answers (base, fine-tuned)"


class FinalSample:
    """The sample answers of one run, generated in a background thread or on demand."""

    def __init__(self, evaluator: CentralEvaluator) -> None:
        self._evaluator = evaluator
        self._thread: threading.Thread | None = None
        self._arrays: Arrays | None = None
        self._answers: tuple[str, str] | None = None
        self._error: BaseException | None = None

    def start(self, arrays: Arrays) -> None:
        """Begin generating for the final adapter ``arrays`` in a thread; returns at once."""
        record = self._evaluator.sample_prompt()
        if record is None or self._thread is not None:
            return
        self._arrays = arrays
        self._thread = threading.Thread(target=self._run, args=(record, arrays), name="fedtune-sample", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        """Until a started generation has finished (the server's model is free again)."""
        if self._thread is not None:
            self._thread.join()

    def result(self, arrays: Arrays) -> dict[str, Any] | None:
        """``summary.json``'s ``sample`` for the final adapter ``arrays`` (None without a held-out set):
        what :meth:`start` generated if it was for these values, else generated now."""
        record = self._evaluator.sample_prompt()
        if record is None:
            return None
        self.wait()
        if self._error is not None:
            raise self._error
        if self._answers is None or self._arrays is None or not _same(self._arrays, arrays):
            self._answers = self._generate(record, arrays)
        cfg = self._evaluator.cfg.data
        base, tuned = self._answers
        return {
            "prompt": record.get(cfg.instruction_field),
            "reference": record.get(cfg.output_field),
            "base": base,
            "fine_tuned": tuned,
        }

    def _run(self, record: dict[str, Any], arrays: Arrays) -> None:
        try:
            self._answers = self._generate(record, arrays)
        except BaseException as exc:  # raised again in the main thread by result()
            self._error = exc

    def _generate(self, record: dict[str, Any], arrays: Arrays) -> tuple[str, str]:
        """Both answers, with one bar over up to 2 x ``eval.max-new-tokens`` tokens."""
        most = self._evaluator.cfg.eval.max_new_tokens
        interactive = sys.stdout.isatty()  # as local training's bar: in place on a terminal, else its last state
        wait = 1.0 if interactive else 1e9
        bar = tqdm(total=2 * most, desc=DESC, unit="token", file=sys.stdout, mininterval=wait, disable=False)
        try:
            answers = []
            for i, adapter in enumerate((None, arrays)):
                answers.append(self._evaluator.answer(record, adapter, on_tokens=bar.update))
                bar.update((i + 1) * most - bar.n)  # an answer that stopped early: count what it did not need
            return answers[0], answers[1]
        finally:
            bar.close()


def _same(a: Arrays, b: Arrays) -> bool:
    return a is b or (a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a))
