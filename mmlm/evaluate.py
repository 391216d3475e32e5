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
from mmlm.processor import IGNORE_INDEX

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
    media_from: dict[int, int] | None = None,
) -> dict[str, Any]:
    """Greedy answers to every question of ``data``; accuracy overall and by question type. A record
    whose images cannot be read is left out and counted by reason under ``skipped`` (once per record).

    Several processes: ``share`` = (this process, processes) answers the questions of every
    processes-th record, and ``gather`` (an object -> list over processes) combines the counts, so
    every process returns the whole evaluation's figures.

    ``media_from``: record -> the record whose media it is shown instead (``image_use``); only the
    questions of the records it maps are asked."""
    proc = model.processor
    qs = questions_from(data.records)[:max_questions]
    if media_from is not None:
        qs = [q for q in qs if q.record in media_from]
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
                    cached = (q.record, data.media(q.record if media_from is None else media_from[q.record]))
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


def media_key(data: StageDataset, i: int) -> tuple:
    """What record ``i`` shows: its media files (or in-memory items) by modality."""
    rec = data.records[i]
    return (
        tuple(str(p) if isinstance(p, str | bytes) or hasattr(p, "__fspath__") else id(p) for p in data.paths[i]),
        tuple(map(str, rec.audios)),
        tuple(map(str, rec.videos)),
    )


def shuffled_media(data: StageDataset, records: Sequence[int]) -> dict[int, int]:
    """For each of ``records`` that has media, another record whose media it can be shown instead:
    the same number of items of each modality, different files. Deterministic: within each group
    of records with the same media counts, the donor is half the group further on (the next one
    with other media), so every record gets one from another sample whenever the group has one."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i in records:
        key = media_key(data, i)
        if any(key):
            groups[tuple(map(len, key))].append(i)
    out = {}
    for members in groups.values():
        n = len(members)
        for k, i in enumerate(members):
            mine = media_key(data, i)
            for step in range(n // 2, n // 2 + n):
                j = members[(k + step) % n]
                if media_key(data, j) != mine:
                    out[i] = j
                    break
    return out


@torch.no_grad()
def answer_loss(
    model, data: StageDataset, records: Sequence[int], media_from: dict[int, int] | None = None, batch_size: int = 64
) -> tuple[float, int]:
    """(summed next-token loss, supervised tokens) of the assistant turns of ``records``, each shown
    its own media or, with ``media_from``, another record's."""
    from mmlm.objectives.lm import supervised_cells, token_loss

    proc = model.processor
    total, count = 0.0, 0
    for start in range(0, len(records), batch_size):
        encoded = []
        for i in records[start : start + batch_size]:
            try:
                media = data.media(i if media_from is None else media_from[i])
            except SampleError:
                continue
            encoded.append(proc.encode(data.records[i].messages, media or None, index=i))
        if not encoded:
            continue
        batch = proc.collate(encoded)
        labels = batch["labels"]
        keep = model.llm_keeps_logits and not any(r.prunes for r in model.reducers.values())
        extra = {"logits_to_keep": supervised_cells(labels)} if keep else {}
        out = model(**model.inputs(batch), **extra)
        targets = out.targets_for(labels.to(out.logits.device))
        total += float(token_loss(out.logits, targets, reduction="sum"))
        count += int((targets != IGNORE_INDEX).sum())
    return total, count


@torch.no_grad()
def image_use(
    model,
    data: StageDataset,
    max_questions: int | None = None,
    batch_size: int = 64,
    max_new_tokens: int = 8,
    share: tuple[int, int] | None = None,
    gather=None,
) -> dict[str, Any]:
    """Whether answers come from the media or from the question alone: on the records of the first
    ``max_questions`` questions that have media, the answer loss per token with each record's own
    media and with another sample's (``shuffled_media``), and the accuracy with the other media. A
    model that reads its images has a much lower matched loss and falls towards chance when the
    images are swapped; one that learnt only the answer format loses nothing."""
    was_training = model.training
    model.eval()
    qs = questions_from(data.records)[:max_questions]
    records = sorted({q.record for q in qs})
    donors = shuffled_media(data, records)
    mine = sorted(i for i in donors if share is None or i % share[1] == share[0])
    matched, shuffled = (
        answer_loss(model, data, mine, None, batch_size),
        answer_loss(model, data, mine, donors, batch_size),
    )
    if gather is not None:
        everyone = gather((matched, shuffled))
        matched = tuple(map(sum, zip(*(m for m, _ in everyone), strict=True)))
        shuffled = tuple(map(sum, zip(*(s for _, s in everyone), strict=True)))
    swapped = evaluate(
        model, data, max_questions, batch_size, max_new_tokens, share=share, gather=gather, media_from=donors
    )
    if was_training:
        model.train()
    return {
        "loss": matched[0] / matched[1] if matched[1] else float("nan"),
        "loss_shuffled": shuffled[0] / shuffled[1] if shuffled[1] else float("nan"),
        "accuracy_shuffled": swapped["vqa_accuracy"],
        "by_type_shuffled": swapped["by_type"],
        "n_eval": swapped["n_eval"],
        "tokens": matched[1],
    }
