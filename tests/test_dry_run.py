"""mmlm train --dry-run (mmlm/train/dry_run.py): what a run would train, read, skip and need, with
nothing trained or written to the run folder."""

from __future__ import annotations

import subprocess
import sys

from helpers import tiny_raw

from mmlm.config import parse_config
from mmlm.data.dataset import StageDataset
from mmlm.data.sources import read_source
from mmlm.model import build
from mmlm.train.dry_run import dry_run


def _raw(data, max_length=64):
    raw = tiny_raw(str(data), n=16, steps=2)
    raw["processor"]["max_length"] = max_length
    raw["train"]["stages"][1]["on_bad_sample"] = "skip"
    raw["train"]["stages"][1]["trainable"] = ["connectors.*"]
    raw["train"]["stages"][1]["lora"] = {"llm": {"r": 4, "target_modules": ["q_proj", "v_proj"]}}
    return raw


def test_the_report_counts_what_each_stage_trains_and_reads(tmp_path):
    raw = _raw(tmp_path / "d")
    cfg = parse_config(raw)
    rep = dry_run(cfg)
    align, instruct = rep["stages"]
    fresh = build(parse_config(tiny_raw()), texts=["x"])
    n_conn = sum(p.numel() for n, p in fresh.named_parameters() if n.startswith("connectors.image."))
    assert align["params"]["connectors.image"]["trainable"] == n_conn
    assert align["trainable"] == n_conn  # align trains connectors.* only
    # instruct: the connector plus LoRA on q_proj and v_proj of both 64-wide layers, r 4: 4*(64+64) each
    assert instruct["params"]["llm"]["trainable"] == 2 * 2 * 4 * (64 + 64)
    assert instruct["trainable"] == n_conn + 2 * 2 * 4 * (64 + 64)
    assert instruct["memory"]["weights"] == 4 * instruct["total"]  # fp32
    assert instruct["memory"]["gradients_and_optimizer"] == 12 * instruct["trainable"]


def test_lengths_and_skips_match_the_encoded_samples(tmp_path):
    probe = parse_config(_raw(tmp_path / "d", max_length=512))
    model = build(probe, texts=["x"])
    recs = read_source(probe.train.stages[1].data[0], "data")
    ds = StageDataset(recs, model.processor, "skip")
    lengths = sorted(
        len(ds.processor.encode(r.messages, {"image": ds.images(i)}).input_ids) for i, r in enumerate(ds.records)
    )
    limit = lengths[len(lengths) // 2]  # about half the samples are longer
    rep = dry_run(parse_config(_raw(tmp_path / "d", max_length=limit)))
    instruct = rep["stages"][1]
    kept = [n for n in lengths if n <= limit]
    assert instruct["lengths"]["max"] == max(kept) and instruct["lengths"]["min"] == min(kept)
    assert instruct["skipped"] == {"too long": len(lengths) - len(kept)}
    assert instruct["samples"] == len(kept)
    assert not instruct["would_stop"]  # on_bad_sample: skip


def test_the_command_prints_the_report_and_writes_nothing_to_the_run_folder(tmp_path):
    import yaml

    raw = _raw(tmp_path / "d")
    raw["train"]["stages"][1]["precision"] = "no"
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "mmlm.cli",
            "train",
            str(tmp_path / "c.yaml"),
            "--dry-run",
            "--out",
            str(tmp_path / "run"),
        ],
        capture_output=True,
        text=True,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
    )
    assert r.returncode == 0, r.stderr
    assert "stage instruct" in r.stdout and "LoRA on llm (r 4)" in r.stdout and "memory per process" in r.stdout
    assert not (tmp_path / "run").exists()


def test_a_billion_parameter_plan_is_reported_without_its_memory(tmp_path):
    """Built from configs, the model is laid out on the meta device: a 1.2B-parameter Llama is counted
    exactly (the formula below, not the code's own count) while the process grows by far less than
    the 4.6 GiB its fp32 weights would take; with 4 processes each holds a quarter of the batch."""
    import resource

    h, i, layers = 2048, 5632, 22
    raw = tiny_raw(str(tmp_path / "d"), n=16, steps=2)
    raw["model"]["llm"]["config"].update(
        hidden_size=h, intermediate_size=i, num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=16
    )
    raw["train"]["stages"][0]["batch_size"] = 8
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rep = dry_run(parse_config(raw), processes=4)
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
    llm = rep["stages"][0]["params"]["llm"]["total"]
    vocab = llm - layers * (4 * h * h + 3 * h * i + 2 * h) - h  # what is left is embedding and head
    assert vocab % h == 0 and 0 < vocab // h <= 2 * 200  # (untied) embedding and head of the fitted vocabulary
    assert llm > 1.1e9 and grown < 1024, grown
    one = dry_run(parse_config(raw), processes=1)["stages"][0]["memory"]
    four = rep["stages"][0]["memory"]
    assert four["batch_per_process"] == 2 and one["batch_per_process"] == 8
    assert four["activations"] < one["activations"] and four["weights"] == one["weights"]
