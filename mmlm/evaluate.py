"""Exact-match VQA evaluation: every assistant turn of the evaluation data is a question, asked with
the gold conversation before it; answers are compared after normalisation (case, punctuation,
articles, spaces)."""

from __future__ import annotations

import re
import string
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mmlm.data.dataset import StageDataset
from mmlm.data.records import Record
from mmlm.errors import SampleError

_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize(text: str) -> str:
    text = text.lower().strip()
    text = text.translate(str.maketrans("", "", string.punctuation))
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


@dataclass
class Question:
    messages: list[dict]
    answer: str
    type: str
    record: int


def questions_from(records: Sequence[Record]) -> list[Question]:
    out = []
    for ri, rec in enumerate(records):
        types = list(rec.info.get("question_types", []))
        k = 0
        for i, m in enumerate(rec.messages):
            if m["role"] != "assistant":
                continue
            qtype = types[k] if k < len(types) else "all"
            out.append(Question(rec.messages[:i], m["content"], qtype, ri))
            k += 1
    return out


@torch.no_grad()
def evaluate(
    model,
    data: StageDataset,
    max_questions: int | None = None,
    batch_size: int = 64,
    max_new_tokens: int = 8,
    return_predictions: bool = False,
    share: tuple[int, int] | None = None,
    gather=None,
) -> dict[str, Any]:
    """Greedy answers to every question of ``data``; accuracy overall and by question type. A record
    whose images cannot be read is left out and counted by reason under ``skipped`` (once per record).

    Several processes: ``share`` = (this process, processes) answers the questions of every
    processes-th record, and ``gather`` (an object -> list over processes) combines the counts, so
    every process returns the whole evaluation's figures."""
    proc = model.processor
    qs = questions_from(data.records)[:max_questions]
    if share is not None:
        qs = [q for q in qs if q.record % share[1] == share[0]]
    correct: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    preds = []
    skipped: Counter = Counter()
    cached: tuple[int | None, list | None] = (None, [])  # questions of one record come together: decode once
    for start in range(0, len(qs), batch_size):
        encoded, chunk = [], []
        for q in qs[start : start + batch_size]:
            if cached[0] != q.record:
                try:
                    cached = (q.record, data.media(q.record))
                except SampleError as err:
                    cached = (q.record, None)
                    skipped[err.reason] += 1
            media = cached[1]
            if media is None:
                continue
            chunk.append(q)
            # a question is a prefix of its record's conversation: the media its turns name so far
            upto = {}
            for name, items in media.items():
                n = sum(m["content"].count(proc.media[name].placeholder) for m in q.messages)
                if n:
                    upto[name] = items[:n]
            encoded.append(proc.encode(q.messages, upto or None, add_generation_prompt=True, index=q.record))
        if not encoded:
            continue
        batch = proc.collate(encoded, padding_side="left")
        outs = model.generate(batch, max_new_tokens=max_new_tokens)
        for q, ids in zip(chunk, outs, strict=False):
            pred = proc.decode(ids)
            ok = int(normalize(pred) == normalize(q.answer))
            for key in (q.type, "__all__"):
                correct[key][0] += ok
                correct[key][1] += 1
            if return_predictions:
                preds.append(
                    {
                        "question": q.messages[-1]["content"],
                        "answer": q.answer,
                        "prediction": pred,
                        "type": q.type,
                        "correct": bool(ok),
                    }
                )
    if gather is not None:
        everyone = gather((dict(correct), dict(skipped), preds))
        merged: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        skipped, all_preds = Counter(), []
        for got_correct, got_skipped, got_preds in everyone:
            for key, (c, n) in got_correct.items():
                merged[key][0] += c
                merged[key][1] += n
            skipped.update(got_skipped)
            all_preds.extend(got_preds)
        correct, preds = merged, all_preds
    total = correct.pop("__all__", [0, 0])
    result = {
        "vqa_accuracy": total[0] / total[1] if total[1] else 0.0,
        "n_eval": total[1],
        "by_type": {t: c / n for t, (c, n) in sorted(correct.items())},
        "n_by_type": {t: n for t, (c, n) in sorted(correct.items())},
        "skipped": dict(skipped),
    }
    if return_predictions:
        result["predictions"] = preds
    return result
