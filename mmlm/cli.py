"""The ``mmlm`` command line: thin commands that call the package."""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from pathlib import Path
from typing import Literal

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Assemble, train, ask and evaluate multimodal LLMs.")
config_app = typer.Typer(no_args_is_help=True, help="Check and show pipeline configs.")
data_app = typer.Typer(no_args_is_help=True, help="Make data sets.")
app.add_typer(config_app, name="config")
app.add_typer(data_app, name="data")
zoo_app = typer.Typer(no_args_is_help=True, help="Known models and components: list, describe, download (verified).")
app.add_typer(zoo_app, name="zoo")
console = Console()
err_console = Console(stderr=True)

SetOpt = typer.Option(None, "--set", help="override a config key: --set train.stages.1.lr=2e-5 (repeatable)")


_debug = {"on": False}


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="show the full traceback of an error")):
    _debug["on"] = debug


def _fail(err: Exception) -> None:
    from rich.markup import escape

    err_console.print(f"[red]error:[/] {escape(' '.join(str(err).split()))}", soft_wrap=True)
    raise typer.Exit(2)


def _user_error(err: Exception) -> bool:
    """A mistake in what the user gave (config, data, checkpoint, image, arguments), as opposed to a
    fault in mmlm: the message alone tells what to fix."""
    from mmlm.errors import (
        CheckpointError,
        ConfigError,
        DataError,
        PlaceholderMismatch,
        RunExists,
        SampleError,
        UnknownComponentError,
    )

    known = (ConfigError, DataError, SampleError, CheckpointError, PlaceholderMismatch, RunExists)
    return isinstance(err, (*known, UnknownComponentError, OSError, ImportError))


def friendly(command):
    """Every error a command meets is one line on stderr (``error: <where>: <what>``, exit 2 for a
    user's mistake, 1 for a fault in mmlm, which asks for a report); ``mmlm --debug`` shows the
    traceback instead."""

    @functools.wraps(command)
    def run(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort, KeyboardInterrupt):
            raise
        except Exception as err:
            if _debug["on"]:
                raise
            if _user_error(err):
                _fail(err)
            from rich.markup import escape

            text = " ".join(str(err).split())
            err_console.print(
                f"[red]error:[/] {type(err).__name__}: {escape(text)} "
                "(rerun with mmlm --debug ... for the traceback; if the input looks right, please report it)",
                soft_wrap=True,
            )
            raise typer.Exit(1) from None

    return run


def _quiet() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except Exception:  # pragma: no cover
        pass


@config_app.command("validate")
@friendly
def config_validate(file: Path, set_: list[str] | None = SetOpt):
    """Check a pipeline YAML: keys, types, component names and options, that the files it names
    exist, and that trainable patterns match the model's parameters (built without weights)."""
    from mmlm.check import check_config
    from mmlm.config import load_config
    from mmlm.errors import ConfigError

    try:
        cfg = load_config(file, set_ or [])
    except (ConfigError, FileNotFoundError) as err:
        _fail(err)
    report = check_config(cfg)
    if report.problems:
        from rich.markup import escape

        for line in report.problems:
            err_console.print(f"[red]error:[/] {escape(line)}", soft_wrap=True)
        raise typer.Exit(2)
    stages = ", ".join(f"{s} ({n} trainable tensors)" for s, n in report.trainable.items()) or "none"
    console.print(f"[green]ok[/] {file}: model {cfg.name}, {report.parameters} parameter tensors, stages: {stages}")


@config_app.command("show")
@friendly
def config_show(file: Path, set_: list[str] | None = SetOpt):
    """Print the resolved config (defaults filled in, overrides applied)."""
    from mmlm.config import load_config
    from mmlm.errors import ConfigError

    try:
        cfg = load_config(file, set_ or [])
    except (ConfigError, FileNotFoundError) as err:
        _fail(err)
    typer.echo(cfg.to_yaml())


@config_app.command("reference")
@friendly
def config_reference_cmd(
    readme: Path | None = typer.Option(None, help="rewrite the reference section of this README instead of printing"),
):
    """Every config key with its type, default and meaning (Markdown), generated from the schema."""
    from mmlm.reference import config_reference, replace_in

    text = config_reference()
    if readme is None:
        typer.echo(text, nl=False)
        return
    readme.write_text(replace_in(readme.read_text(), text))
    console.print(f"updated the config reference in {readme}")


@app.command("list")
@friendly
def list_parts():
    """Every registered encoder, connector, LLM source and data format."""
    from mmlm.registry import ALL

    for kind, reg in ALL.items():
        typer.echo(kind)
        for e in reg.entries():
            typer.echo(f"  {e.name:<14} {e.summary}")


@data_app.command("shapes")
@friendly
def data_shapes(
    out: Path = typer.Option(..., help="output folder"),
    n: int = typer.Option(1000, help="images"),
    seed: int = typer.Option(0, help="seed (use disjoint seeds for held-out splits)"),
    image_size: int = typer.Option(96, help="image side in pixels"),
):
    """Write the shapes world: PNG images, captions and VQA in LLaVA JSON, per-patch labels."""
    from mmlm.data.shapes import generate

    info = generate(out, n, seed=seed, image_size=image_size)
    console.print(f"wrote {info['n_images']} images and {info['n_questions']} questions to {out} ({info['by_type']})")


@data_app.command("tones")
@friendly
def data_tones(
    out: Path = typer.Option(..., help="output folder"),
    n: int = typer.Option(1000, help="clips"),
    seed: int = typer.Option(0, help="seed (use disjoint seeds for held-out splits)"),
):
    """Write the tones world: WAV clips of beeps (pitch, count, contour, timbre), captions and questions."""
    from mmlm.data.tones import generate

    info = generate(out, n, seed=seed)
    console.print(f"wrote {info['n']} clips and {info['questions']} questions to {out}")


@data_app.command("clips")
@friendly
def data_clips(
    out: Path = typer.Option(..., help="output folder"),
    n: int = typer.Option(1000, min=1, help="clips"),
    seed: int = typer.Option(0, help="seed (use disjoint seeds for held-out splits)"),
    image_size: int = typer.Option(48, min=16, help="frame side in pixels"),
    frames: int = typer.Option(8, min=4, help="frames per clip"),
):
    """Write the clips world: folders of PNG frames where a shape moves or appears or disappears,
    captions and questions."""
    from mmlm.data.clips import generate

    info = generate(out, n, seed=seed, image_size=image_size, frames=frames)
    console.print(f"wrote {info['n']} clips and {info['questions']} questions to {out} ({info['by_type']})")


@data_app.command("shapes-retrieval")
@friendly
def data_shapes_retrieval(
    out: Path = typer.Option(..., help="output folder"),
    n: int = typer.Option(200, min=1, help="queries per task (with --pairs: scenes)"),
    seed: int = typer.Option(..., help="seed; evaluation tasks and training pairs need different seeds"),
    candidates: int = typer.Option(100, min=2, help="distinct candidates per query"),
    image_size: int = typer.Option(32, min=6, help="image side in pixels"),
    pairs: bool = typer.Option(False, "--pairs", help="write contrastive training pairs instead of evaluation tasks"),
):
    """Write the shapes world's retrieval tasks in MMEB's layout (image->caption, caption->image, VQA,
    same colour / same shape), or with --pairs training pairs with hard negatives (pairs.jsonl)."""
    from mmlm.data.shapes_retrieval import generate_pairs, generate_retrieval

    if pairs:
        info = generate_pairs(out, n, seed=seed, image_size=image_size)
        console.print(f"wrote {info['total']} pairs to {out / 'pairs.jsonl'} ({info['rows']})")
        return
    info = generate_retrieval(out, n, seed=seed, candidates=candidates, image_size=image_size)
    console.print(f"wrote retrieval tasks to {out}: rows {info['rows']}, candidates {info['candidates']}")
    for task, why in info["short"].items():
        console.print(f"{task}: {why}")


@app.command("train")
@friendly
def train_cmd(
    config: Path,
    out: Path | None = typer.Option(None, help="run folder (default runs/NAME)"),
    stage: str | None = typer.Option(None, help="run only this stage"),
    resume: bool = typer.Option(False, "--resume", help="continue the run in --out from its last saved step"),
    set_: list[str] | None = SetOpt,
    dry_run: bool = typer.Option(
        False, "--dry-run", help="build the model and read the data, report parameters, lengths and memory; no training"
    ),
    processes: int = typer.Option(
        1, "--processes", min=1, help="train on N processes on this machine (starts `accelerate launch` with DDP)"
    ),
):
    """Train the stages a pipeline YAML declares; each stage ends in a checkpoint. Several processes:
    --processes N, or run this command under `accelerate launch` / `torchrun`."""
    _quiet()
    import signal

    from mmlm.config import load_config
    from mmlm.errors import ConfigError, RunExists, SampleError
    from mmlm.train.progress import ConsoleReporter
    from mmlm.train.runner import train

    def on_sigterm(signum, frame):  # what schedulers send before preemption: stop as Ctrl-C does
        raise KeyboardInterrupt("SIGTERM")

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        # without --out the run folder is runs/NAME, which is also what ${out} resolves to
        cfg = load_config(config, set_ or [], variables={"out": str(out)} if out else None)
        out = out or Path("runs") / cfg.name
        if processes > 1 and not dry_run:  # the config read here first: its errors come without a launcher
            from mmlm.train.launch import launch

            raise typer.Exit(launch(processes, config, out, stage, resume, set_ or [], debug=_debug["on"]))
        if dry_run:
            from mmlm.train.dry_run import dry_run as run_dry
            from mmlm.train.dry_run import format_report

            report = run_dry(cfg, processes=processes)
            console.print(format_report(report), soft_wrap=True, markup=False, highlight=False)
            return
        train(cfg, out, stage=stage, resume=resume, reporter=ConsoleReporter())
    except (ConfigError, RunExists, SampleError, FileNotFoundError) as err:
        _fail(err)
    except KeyboardInterrupt as err:
        from rich.markup import escape

        err_console.print(f"[yellow]interrupted:[/] {escape(str(err) or 'before training started')}", soft_wrap=True)
        raise typer.Exit(130) from None
    if os.environ.get("RANK", "0") == "0":  # the main process (or the only one)
        console.print(f"checkpoint: {out / 'final'}")


@app.command("ask")
@friendly
def ask_cmd(
    checkpoint: Path,
    question: str,
    image: list[Path] | None = typer.Option(None, help="image file (repeat for several, in order)"),
    audio: list[Path] | None = typer.Option(None, help="sound file: WAV, FLAC (repeat for several, in order)"),
    video: list[Path] | None = typer.Option(
        None, help="video: a folder of frame images or a video file (PyAV) (repeat for several, in order)"
    ),
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = typer.Option(None, help="sampling seed (the API's seed gives the same answer)"),
    stream: bool = False,
    set_: list[str] | None = SetOpt,
):
    """Answer one question about images (or none) with a trained checkpoint; --set changes what
    needs no retraining (model.token_reduction.image.keep=0.25)."""
    _quiet()
    from mmlm.checkpoint import load
    from mmlm.errors import SampleError
    from mmlm.images import load_image

    try:
        model = load(checkpoint, overrides=tuple(set_ or ()))
    except FileNotFoundError as err:
        _fail(err)
    img = []
    for path in image or []:
        try:
            img.append(load_image(path, model.processor.config.max_image_pixels))
        except SampleError as err:
            _fail(ValueError(f"--image: {err}"))
    ids: list[int] = []
    shown = ""

    def emit(step, toks):  # --stream: print what the answer's text gained with this token
        nonlocal shown
        if toks[0] >= 0:
            ids.append(toks[0])
            text = model.processor.decode(ids)
            if text.startswith(shown):
                sys.stdout.write(text[len(shown) :])
                sys.stdout.flush()
                shown = text

    try:
        answer = model.ask(
            question,
            img,
            audio=[str(a) for a in audio] if audio else None,
            video=[str(v) for v in video] if video else None,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stream=emit if stream else None,
        )
    except (ValueError, SampleError) as err:  # placeholder count, an over-long question
        _fail(err)
    print(answer[len(shown) :] if answer.startswith(shown) else answer)


def _print_table(title: str, m: dict) -> None:
    use = m.get("image_use")
    t = Table(title=title)
    t.add_column("question type")
    t.add_column("n", justify="right")
    t.add_column("accuracy", justify="right")
    if use:
        t.add_column("with another sample's image", justify="right")
    shuffled = (use or {}).get("by_type_shuffled", {})
    for k, v in m["by_type"].items():
        if k != "all":  # questions without a type are counted in the "all" row alone
            extra = [f"{shuffled[k]:.3f}" if k in shuffled else ""] if use else []
            t.add_row(k, str(m.get("n_by_type", {}).get(k, "")), f"{v:.3f}", *extra)
    extra = [f"[bold]{use['accuracy_shuffled']:.3f}[/]"] if use else []
    t.add_row("[bold]all[/]", str(m["n_eval"]), f"[bold]{m['vqa_accuracy']:.3f}[/]", *extra)
    console.print(t)
    if use:
        console.print(
            f"image use: answer loss {use['loss']:.3f} nats/token with each question's own image, "
            f"{use['loss_shuffled']:.3f} with another sample's ({use['tokens']} answer tokens)"
        )


@app.command("eval")
@friendly
def eval_cmd(
    checkpoint: Path,
    data: Path = typer.Option(..., help="vqa: LLaVA JSON/JSONL or questions JSONL; retrieval: MMEB rows (JSON/JSONL)"),
    image_root: Path | None = typer.Option(None, help="folder the image paths are relative to"),
    out: Path | None = typer.Option(None, help="write metrics JSON here, with every prediction (or skipped row)"),
    max_questions: int | None = None,
    batch_size: int = 64,
    max_new_tokens: int = 16,
    task: Literal["vqa", "retrieval"] = typer.Option("vqa", help="vqa: answers; retrieval: MMEB-style ranking"),
    dim: int | None = typer.Option(None, help="retrieval: Matryoshka dimension of the embeddings"),
    instruction: str | None = typer.Option(None, help="retrieval: instruction given to every query"),
    image_check: bool = typer.Option(
        True, help="vqa: also score each question with another sample's image (loss and accuracy)"
    ),
    set_: list[str] | None = SetOpt,
):
    """vqa: exact-match accuracy, overall and per question type, and whether the answers use the
    image (the same questions shown another sample's image). retrieval: P@1, R@5, nDCG@10 and
    MRR of each query's own candidate list (the positive first), per subset and overall."""
    _quiet()
    overrides = tuple(set_ or ())
    if task == "retrieval":
        return _eval_retrieval(checkpoint, data, image_root, out, batch_size, dim, instruction, overrides)
    if dim is not None or instruction is not None:
        _fail(ValueError("--dim and --instruction are options of --task retrieval"))
    from mmlm.checkpoint import load
    from mmlm.data.dataset import StageDataset
    from mmlm.data.sources import LlavaOptions, read_llava
    from mmlm.evaluate import evaluate, image_use

    try:
        model = load(checkpoint, overrides=overrides)
        recs = read_llava(LlavaOptions(path=str(data), image_root=str(image_root) if image_root else None))
    except (FileNotFoundError, ValueError) as err:
        _fail(err)
    ds = StageDataset(recs, model.processor, "skip", name=str(data))
    if ds.skipped:
        console.print(f"skipped {sum(ds.skipped.values())} samples: {dict(ds.skipped)}")
    m = evaluate(
        model,
        ds,
        max_questions=max_questions,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        return_predictions=out is not None,
    )
    if image_check:
        use = image_use(model, ds, max_questions=max_questions, batch_size=batch_size, max_new_tokens=max_new_tokens)
        if use["n_eval"]:
            m["image_use"] = use
    if m["skipped"]:
        console.print(f"left out {sum(m['skipped'].values())} samples whose images cannot be read: {m['skipped']}")
    _print_table(f"{checkpoint} on {data}", m)
    if out:
        out.write_text(json.dumps(m, indent=2))


def _rate_progress():
    """A progress bar on stderr with items per second."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
    from rich.text import Text

    class Rate(ProgressColumn):
        def render(self, task):
            speed = task.speed or (task.completed / task.elapsed if task.elapsed else None)
            return Text(f"{speed:.1f} items/s" if speed else "- items/s")

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        Rate(),
        TimeElapsedColumn(),
        console=err_console,
        transient=False,
    )


@app.command("embed")
@friendly
def embed_cmd(
    checkpoint: Path,
    input: Path = typer.Option(..., "--input", help="JSONL rows {id?, text?, image?, instruction?}"),
    output: Path = typer.Option(..., "--output", help=".npy (ids in NAME.ids.json), .parquet or .safetensors"),
    image_root: Path | None = typer.Option(None, help="folder image paths are relative to (default: the input's)"),
    batch_size: int = typer.Option(32, help="items per forward"),
    dim: int | None = typer.Option(None, help="Matryoshka: keep the first DIM values, then renormalise"),
    instruction: str | None = typer.Option(None, help="instruction for rows without their own"),
    side: Literal["query", "candidate"] = typer.Option("query", help="which prompt templates of the config"),
    device: str | None = typer.Option(None, help="cpu, cuda, cuda:1, mps (default: where the model loads)"),
    on_bad_sample: Literal["skip", "error"] = typer.Option(
        "skip", help="skip: leave a bad row out, name it and list it in NAME.skipped.jsonl; error: stop"
    ),
):
    """Embed every row of a JSONL file into .npy, .parquet or .safetensors (L2-normalised float32)."""
    _quiet()
    import time

    from rich.markup import escape

    from mmlm.checkpoint import load
    from mmlm.embed.files import check_output, embed_file

    check_output(output)  # a wrong suffix or a missing pyarrow, before the model loads
    model = load(checkpoint, device=device)
    start = time.perf_counter()
    with _rate_progress() as bar:
        task = bar.add_task("embedding", total=None)
        res = embed_file(
            model,
            input,
            output,
            image_root=image_root,
            batch_size=batch_size,
            dim=dim,
            instruction=instruction,
            side=side,
            on_bad_sample=on_bad_sample,
            on_start=lambda n: bar.update(task, total=n),
            on_progress=lambda n: bar.advance(task, n),
            on_skip=lambda s: bar.console.print(
                f"[yellow]skipped[/] {escape(s.where(str(input)))}: {escape(s.reason)}: {escape(s.message)}",
                soft_wrap=True,
            ),
        )
    seconds = time.perf_counter() - start
    if res["skipped_file"]:
        err_console.print(f"skipped {res['skipped']} rows, listed in {res['skipped_file']}", soft_wrap=True)
    if not res["embedded"]:
        _fail(ValueError(f"{input}: no row could be embedded ({res['skipped']} skipped); nothing written"))
    extra = f" (ids in {res['ids']})" if res["ids"] else ""
    err_console.print(
        f"embedded {res['embedded']} rows in {seconds:.1f}s ({res['embedded'] / max(seconds, 1e-9):.1f} items/s) "
        f"into {res['output']}{extra}",
        soft_wrap=True,
    )


def _eval_retrieval(checkpoint, data, image_root, out, batch_size, dim, instruction, overrides=()) -> None:
    from rich.markup import escape

    from mmlm.checkpoint import load
    from mmlm.embed.retrieval import evaluate_retrieval

    model = load(checkpoint, overrides=overrides)
    with _rate_progress() as bar:
        task = bar.add_task("embedding", total=None)
        m = evaluate_retrieval(
            model,
            data,
            image_root=image_root,
            batch_size=batch_size,
            dim=dim,
            instruction=instruction,
            on_start=lambda n: bar.update(task, total=n),
            on_progress=lambda n: bar.advance(task, n),
        )
    skipped = m["skipped"]
    for s in skipped["rows"][:10]:
        err_console.print(
            f"[yellow]skipped[/] {escape(s['where'])}: {escape(s['reason'])}: {escape(s['message'])}", soft_wrap=True
        )
    if skipped["count"]:
        more = f"; all in {out}" if out else ""
        err_console.print(f"skipped {skipped['count']} rows {skipped['by_reason']}{more}", soft_wrap=True)
    t = Table(title=f"{checkpoint} on {data}")
    for col in ("subset", "n", "P@1", "R@5", "nDCG@10", "MRR"):
        t.add_column(col, justify="left" if col == "subset" else "right")
    shown = [*m["subsets"].items(), *([("[bold]mean of subsets[/]", m["macro"])] if "macro" in m else [])]
    for name, r in [*shown, ("[bold]all[/]", m["overall"])]:
        t.add_row(
            name,
            str(r["n"]),
            *("-" if r[k] is None else f"{r[k]:.3f}" for k in ("precision@1", "recall@5", "ndcg@10", "mrr")),
        )
    console.print(t)
    if out:
        out.write_text(json.dumps(m, indent=2))
    if not m["overall"]["n"]:
        _fail(ValueError(f"{data}: no row could be evaluated ({skipped['count']} skipped)"))


@app.command("export")
@friendly
def export_cmd(
    checkpoint: Path,
    out: Path = typer.Option(..., "--out", help="the folder to write"),
    format: str = typer.Option(
        "hf-llava",
        "--format",
        help="hf-llava: transformers' LlavaForConditionalGeneration; mmlm: an mmlm checkpoint (with --merge-lora)",
    ),
    license: str = typer.Option("other", help="the model card's licence"),
    dtype: str | None = typer.Option(None, help="float32, bfloat16 or float16 (default: the LLM's)"),
    overwrite: bool = typer.Option(False, help="replace a non-empty --out"),
    merge_lora: bool = typer.Option(False, "--merge-lora", help="fold LoRA adapters into the weights they adapt"),
):
    """Write a checkpoint in a format the rest of the ecosystem loads (transformers, vLLM, SGLang)."""
    _quiet()
    if format not in ("hf-llava", "mmlm"):
        _fail(ValueError(f"--format {format!r}: the formats are hf-llava and mmlm"))
    if format == "mmlm":
        from mmlm.checkpoint import export_merged

        if not merge_lora:
            _fail(ValueError("--format mmlm rewrites a checkpoint with its LoRA adapters merged: add --merge-lora"))
        try:
            merged = export_merged(checkpoint, out, overwrite=overwrite)
        except (ValueError, FileExistsError) as err:
            _fail(err)
        console.print(f"wrote {out}: the adapters on {', '.join(merged)} merged into their weights")
        return
    from mmlm.zoo.llava_export import export_llava

    try:
        path = export_llava(checkpoint, out, license=license, dtype=dtype, overwrite=overwrite, merge_lora=merge_lora)
    except (ValueError, FileExistsError) as err:
        _fail(err)
    console.print(f"wrote {path}: AutoModelForImageTextToText.from_pretrained({str(path)!r}) loads it")


@app.command("import")
@friendly
def import_cmd(
    source: str = typer.Argument(..., help="a transformers Llava folder or hub id (or an original LLaVA one)"),
    out: Path = typer.Option(..., "--out", help="the mmlm checkpoint folder to write (new or empty)"),
    revision: str | None = typer.Option(None, help="hub revision (a full commit pins it)"),
    name: str | None = typer.Option(None, help="the model's name in its config (default: the source's)"),
):
    """Turn a Hugging Face Llava checkpoint into an mmlm checkpoint (same logits, same answers)."""
    _quiet()
    from mmlm.zoo.llava_import import ImportError_, import_llava

    try:
        ckpt = import_llava(source, out, revision=revision, name=name)
    except ImportError_ as err:
        _fail(err)
    console.print(f'checkpoint: {ckpt}  (try: mmlm ask {ckpt} --image IMAGE "what is in the image?")')


@zoo_app.command("list")
@friendly
def zoo_list():
    """The catalog's entries."""
    from mmlm.zoo.catalog import load_catalog

    t = Table(title="mmlm zoo")
    for col in ("name", "kind", "size", "license", "description"):
        t.add_column(col)
    for name, e in load_catalog().entries.items():
        lic = e.license + (" (research only)" if e.research_only else "")
        t.add_row(name, e.kind, e.size, lic, e.description)
    console.print(t)


@zoo_app.command("info")
@friendly
def zoo_info(name: str):
    """One entry: its pinned source, files, licence and the config that uses it."""
    from mmlm.zoo.catalog import entry

    try:
        e = entry(name)
    except KeyError as err:
        _fail(ValueError(str(err).strip("'\"")))
    console.print_json(e.model_dump_json(exclude_none=True))


@zoo_app.command("download")
@friendly
def zoo_download(
    name: str,
    dir: Path | None = typer.Option(None, "--dir", help="cache folder (default: the hub cache / ~/.cache/mmlm/zoo)"),
    offline: bool = typer.Option(False, help="fetch nothing: check what is already here"),
):
    """Fetch an entry at its pinned revision or digest (the licence is shown first) and verify it."""
    from mmlm.zoo.catalog import entry, local_path
    from mmlm.zoo.download import DownloadError

    try:
        e = entry(name)
    except KeyError as err:
        _fail(ValueError(str(err).strip("'\"")))
    note = " [bold red]research only[/]" if e.research_only else ""
    console.print(f"{name}: licence {e.license}{note}; {e.size}")
    try:
        path = local_path(name, dir, offline=offline)
    except DownloadError as err:
        _fail(err)
    console.print(f"verified: {path}")
    if e.needs_import:
        console.print(f"next: mmlm import {path} --out CKPT")


LimitOpt = typer.Option(None, "--limit", help="a serving limit: --limit max_images=4 (repeatable; see README)")


@app.command("serve")
@friendly
def serve_cmd(
    checkpoint: Path,
    host: str = typer.Option("127.0.0.1", help="address to listen on (0.0.0.0: every interface)"),
    port: int = 8000,
    api_key: str | None = typer.Option(None, envvar="MMLM_API_KEY", help="require Authorization: Bearer KEY"),
    model_name: str | None = typer.Option(None, help="the model id clients name (default: the config's name)"),
    limit: list[str] | None = LimitOpt,
    ui: bool = typer.Option(True, help="mount the Gradio chat at /ui"),
    device: str | None = None,
):
    """Serve a checkpoint with an OpenAI-compatible API (chat completions, embeddings) and the chat UI."""
    from mmlm.serve.limits import limits_from
    from mmlm.serve.run import serve

    serve(checkpoint, host, port, api_key, limits_from(limit or []), model_name, ui, device)


@app.command("chat")
@friendly
def chat_cmd(
    checkpoint: Path,
    host: str = "127.0.0.1",
    port: int = 7860,
    share: bool = typer.Option(False, help="also open a public Gradio share link"),
    examples: Path | None = typer.Option(None, help="a folder of images for example prompts"),
    limit: list[str] | None = LimitOpt,
    device: str | None = None,
):
    """Chat with a checkpoint in the browser (Gradio): text and images, streamed answers."""
    from mmlm.serve.limits import limits_from
    from mmlm.serve.run import chat

    chat(checkpoint, host, port, share, limits_from(limit or []), examples, device)


@app.command("demo")
@friendly
def demo_cmd(
    out: Path = typer.Option(Path("runs/demo"), help="run folder"),
    embed: bool = typer.Option(False, "--embed", help="then turn the model into a retrieval model (shapes-embed.yaml)"),
    chat: bool = typer.Option(False, "--chat", help="then open the Gradio chat on the trained model"),
    audio: bool = typer.Option(
        False, "--audio", help="train the image + audio recipe (shapes and tones worlds; default --out runs/demo-audio)"
    ),
    video: bool = typer.Option(
        False, "--video", help="train the video recipe (the clips world; default --out runs/demo-video)"
    ),
    llm: Literal["tiny", "smollm2"] = typer.Option(
        "tiny",
        "--llm",
        help="tiny: a 3-layer Llama from scratch (shapes-tiny.yaml); smollm2: the pretrained SmolLM2-135M-Instruct "
        "from its GGUF file, with LoRA (shapes-smollm2.yaml; default --out runs/demo-smollm2)",
    ),
    port: int = typer.Option(7860, help="--chat: the chat's port"),
    set_: list[str] | None = SetOpt,
):
    """Generate the shapes world, train the tiny recipe, evaluate on held-out questions; with
    --embed, then train the contrastive recipe and print the retrieval table before and after."""
    _quiet()
    from mmlm.demo import run_demo
    from mmlm.train.progress import ConsoleReporter

    if audio and video:
        _fail(ValueError("give --audio or --video, not both"))
    if llm != "tiny" and (audio or video or embed):
        _fail(ValueError("--llm smollm2 trains the image recipe; it does not combine with --audio, --video or --embed"))
    if llm == "smollm2":
        from mmlm.demo import SMOLLM2_CONFIG

        if out == Path("runs/demo"):
            out = Path("runs/demo-smollm2")
        m = run_demo(out, set_ or [], reporter=ConsoleReporter(), config=SMOLLM2_CONFIG)
    elif audio or video:
        from mmlm.demo import AUDIO_CONFIG, VIDEO_CONFIG

        if out == Path("runs/demo"):
            out = Path("runs/demo-audio" if audio else "runs/demo-video")
        m = run_demo(out, set_ or [], reporter=ConsoleReporter(), config=AUDIO_CONFIG if audio else VIDEO_CONFIG)
    else:
        m = run_demo(out, set_ or [], reporter=ConsoleReporter())
    if m.get("curve"):
        t = Table(title="accuracy curve (held-out subset)")
        use = "shuffled_loss" in m["curve"][-1]
        cols = ("step", "stage seconds", "loss", "accuracy")
        for col in cols + (("held-out loss", "with other images", "accuracy with other images") if use else ()):
            t.add_column(col, justify="right")
        for pt in m["curve"]:
            extra = (
                [f"{pt['heldout_loss']:.3f}", f"{pt['shuffled_loss']:.3f}", f"{pt['shuffled_accuracy']:.3f}"]
                if use and "shuffled_loss" in pt
                else ["", "", ""]
                if use
                else []
            )
            loss = "-" if pt.get("loss") is None else f"{pt['loss']:.3f}"  # none before the first logged step
            t.add_row(str(pt["step"]), str(pt["seconds"]), loss, f"{pt['vqa_accuracy']:.3f}", *extra)
        console.print(t)
    _print_table(f"held-out VQA ({m['n_eval']} questions)", m)
    if m.get("by_modality"):
        t = Table(title="held-out accuracy by modality")
        for col in ("modality", "n", "accuracy"):
            t.add_column(col, justify="right" if col != "modality" else "left")
        for name, v in m["by_modality"].items():
            t.add_row(name, str(v["n"]), f"{v['accuracy']:.3f}")
        console.print(t)
    console.print(f"wall time {m['wall_seconds']}s; metrics: {out / 'metrics.json'}")
    qfile = out / "data" / "heldout" / "questions.jsonl"
    q = (
        json.loads(qfile.read_text().splitlines()[0])
        if qfile.is_file()
        else {"image": "IMAGE.png", "question": "how many objects are there?"}
    )
    kind = next((k for k in ("video", "audio", "image") if k in q), "image")  # the held-out row's media
    media = out / "data" / "heldout" / q[kind] if qfile.is_file() else q[kind]
    console.print(f'ask the trained model:\n  mmlm ask {out / "final"} --{kind} {media} "{q["question"]}"')
    if embed:
        from mmlm.demo import run_embed_demo

        r = run_embed_demo(out, reporter=ConsoleReporter())
        t = Table(title=f"held-out retrieval, {r['candidates']} candidates per query (P@1 / MRR)")
        for col in ("task", "n", "before: P@1", "MRR", "after: P@1", "MRR "):
            t.add_column(col, justify="right" if col != "task" else "left")
        for name, m in r["tasks"].items():
            b, a = m["before"], m["after"]
            t.add_row(
                name,
                str(a["n"]),
                f"{b['precision@1']:.3f}",
                f"{b['mrr']:.3f}",
                f"{a['precision@1']:.3f}",
                f"{a['mrr']:.3f}",
            )
        console.print(t)
        console.print(f"embedding model: {r['checkpoint']}; metrics: {out / 'embed' / 'metrics.json'}")
    if chat:
        from mmlm.serve.limits import ServeLimits
        from mmlm.serve.run import chat as run_chat

        console.print(f"chat with the trained model: http://127.0.0.1:{port}")
        run_chat(out / "final", port=port, limits=ServeLimits(), examples_dir=out / "data" / "heldout" / "images")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
