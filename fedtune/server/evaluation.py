"""Server-side evaluation: centralized held-out metrics, and base vs fine-tuned sample answers."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from fedtune.config import RunConfig
from fedtune.core.arrays import Arrays
from fedtune.data.checks import cut_phrase
from fedtune.data.loaders import eval_source, load_records
from fedtune.data.prompts import Example, prompt_ids, tokenize_counted
from fedtune.model import task_metrics
from fedtune.model.adapters import load_adapter_arrays
from fedtune.model.generation import TokenCounter, left_pad, task_scores
from fedtune.model.loading import LoadedModel
from fedtune.model.methods import METHODS, wrap
from fedtune.model.scoring import heldout_loss

log = logging.getLogger(__name__)


class CentralEvaluator:
    """``eval.metrics`` of a global adapter on the server's own held-out set."""

    def __init__(self, cfg: RunConfig, loaded: LoadedModel, base_arrays: Arrays | None = None) -> None:
        self.cfg = cfg
        self.loaded = loaded
        self.base_arrays = base_arrays
        """The base model's own trainable weights (bitfit / full answer with them as "base")."""
        source = eval_source(cfg.data)
        self.records: list[dict[str, Any]] = []
        self.examples: list[Example] = []
        if source is not None:
            key = "data.eval-path" if cfg.data.eval_path else "data.path"
            rows = load_records(source, cfg.data, key=key)
            chosen = rows.select(range(min(len(rows), cfg.data.max_eval_examples)))
            tokenized = tokenize_counted(chosen, cfg.data, loaded.tokenizer)  # drops what truncation drops
            self.records, self.examples = tokenized.records, tokenized.examples
            cut = tokenized.counts
            if cut.too_long:
                log.warning(
                    "server held-out set %s: %d of %d examples longer than `data.max-seq-len` = %d tokens (%s)",
                    *(source, cut.too_long, len(chosen), cfg.data.max_seq_len),
                    cut_phrase(cut.prompts_cut, cut.responses_too_long, cfg.data.truncation),
                )

    def __call__(self, arrays: Arrays, cfg: RunConfig | None = None) -> dict[str, float]:
        """The metrics the round's ``eval.metrics`` (``cfg``, default the run's) names, by name."""
        cfg = cfg or self.cfg
        if not self.examples:
            return {}
        model = self._model(arrays)
        tok = self.loaded.tokenizer
        out: dict[str, float] = {}
        if task_metrics.LOSS in cfg.eval.metric_names():
            pad_id = int(tok.pad_token_id)
            out[task_metrics.LOSS] = heldout_loss(model, self.examples, batch_size=cfg.eval.batch_size, pad_id=pad_id)
        scores, _ = task_scores(model, tok, self.records, cfg.data, cfg.eval)
        return {**out, **scores}

    def _model(self, arrays: Arrays) -> Any:
        """The method's model (the global adapter's slot active) with ``arrays`` loaded."""
        model = wrap(self.loaded, self.cfg)
        load_adapter_arrays(model, arrays)
        return model

    def sample_prompt(self) -> dict[str, Any] | None:
        """The held-out record whose answer the run shows before and after training."""
        return self.records[0] if self.records else None

    @torch.no_grad()
    def answer(
        self, record: dict[str, Any], arrays: Arrays | None, on_tokens: Callable[[int], object] | None = None
    ) -> str:
        """Greedy answer of the base model (``arrays`` None) or of the base plus that adapter;
        ``on_tokens(n)`` hears of each new token as it is generated (a progress bar)."""
        tok = self.loaded.tokenizer
        rows = [prompt_ids(record, self.cfg.data, tok, self.cfg.eval.max_new_tokens)]
        ids = left_pad(rows, int(tok.pad_token_id), self.loaded.device)
        kwargs = {
            "max_new_tokens": self.cfg.eval.max_new_tokens,
            "do_sample": False,
            "pad_token_id": tok.pad_token_id,
            "use_cache": True,
            "streamer": TokenCounter(on_tokens) if on_tokens is not None else None,
        }
        if arrays is None and METHODS[self.cfg.peft.method].peft:
            model = wrap(self.loaded, self.cfg)
            with model.disable_adapter():
                out = model.generate(**ids, **kwargs)
        elif arrays is None:
            if self.base_arrays is None:
                raise ValueError("bitfit / full need the base weights to answer as the base model")
            out = self._model(self.base_arrays).generate(**ids, **kwargs)
        else:
            out = self._model(arrays).generate(**ids, **kwargs)
        text = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
        return str(text).strip()
