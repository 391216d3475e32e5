"""``mmlm import SOURCE --out CKPT``: a transformers Llava checkpoint (or an original LLaVA one) as an
mmlm checkpoint.

Sources (a local folder, or a hub id fetched with ``huggingface_hub``):

- transformers' ``LlavaForConditionalGeneration`` in either key layout: the on-disk one of every
  llava-hf repo (``language_model.model.*``, ``vision_tower.*``, ``multi_modal_projector.*``) and the
  in-memory one of transformers 4.52+ and 5.x (``model.language_model.*``, ``lm_head.weight``);
  transformers itself reads both, and the parts are taken from the model it loads;
- the original LLaVA layout (``model.mm_projector.0/.2``, ``model.layers.*``, ``lm_head``, the tower
  named by ``mm_vision_tower`` in config.json and read from its own folder or hub id).

The checkpoint written (see ../shared/CONVENTIONS.md, "Hugging Face Llava"):

- ``parts/vision``: the vision tower (``save_pretrained``) and the source's image preprocessing;
  ``parts/llm``: the causal LM with the source's tokenizer and chat template. The checkpoint's
  config names them by paths relative to the checkpoint, so the folder can move; mmlm references
  them as pretrained sources, and ``model.safetensors`` holds the projector only (the delta).
- ``mmlm.yaml``: an ``hf`` encoder with Llava's feature layer(s) (several: ``fusion: concat``, as
  Llava concatenates them) and select strategy (``default`` drops CLS: ``drop_prefix_tokens``), an
  ``mlp`` connector of depth 2 with the projector's activation, the ``hf`` LLM. The image token
  count is checked against the source's ``image_seq_length``.
- chat templates written for transformers' content lists (``[{"type": "image"}, {"type": "text"}]``)
  get a prelude that turns mmlm's string messages (``<image>`` inline) into such lists first.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

ACTIVATION = {"gelu": "gelu", "relu": "relu", "silu": "silu", "swish": "silu", "tanh": "tanh"}
_CONTENT_LIST_PRELUDE = (
    "{%- set _mmlm = namespace(msgs=[]) -%}"
    "{%- for m in messages -%}"
    "{%- if m['content'] is string -%}"
    "{%- set _p = namespace(items=[]) -%}"
    "{%- for seg in m['content'].split('<image>') -%}"
    "{%- if not loop.first -%}{%- set _p.items = _p.items + [{'type': 'image'}] -%}{%- endif -%}"
    "{%- set t = seg[1:] if (not loop.first and seg.startswith('\\n')) else seg -%}"
    "{%- if t -%}{%- set _p.items = _p.items + [{'type': 'text', 'text': t}] -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- set _mmlm.msgs = _mmlm.msgs + [{'role': m['role'], 'content': _p.items}] -%}"
    "{%- else -%}{%- set _mmlm.msgs = _mmlm.msgs + [m] -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- set messages = _mmlm.msgs -%}"
)


class ImportError_(ValueError):
    """The source cannot be imported; the message says what does not fit."""


def _local(source: str | Path, revision: str | None) -> Path:
    p = Path(source).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise ImportError_(f"{source}: not a folder (a Llava checkpoint is a folder with config.json)")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
        raise ImportError_(f"{source}: no such folder, and huggingface_hub is not installed to fetch it") from None
    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
    try:
        return Path(snapshot_download(str(source), revision=revision, allow_patterns=patterns))
    except Exception as err:
        raise ImportError_(f"{source}: no such folder, and the hub download failed: {err}") from None


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ImportError_(f"{folder}: no .safetensors weights (pytorch_model.bin is not read: convert it first)")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


def layout_of(keys) -> str:
    """``disk`` (llava-hf repos), ``memory`` (transformers 4.52+/5.x in memory) or ``original`` (LLaVA)."""
    keys = list(keys)
    if any(k.startswith("model.mm_projector.") for k in keys):
        return "original"
    if any(k.startswith("model.language_model.") or k.startswith("model.multi_modal_projector.") for k in keys):
        return "memory"
    if any(k.startswith("language_model.") or k.startswith("multi_modal_projector.") for k in keys):
        return "disk"
    raise ImportError_("the weights are in no Llava layout known to mmlm (no projector keys found)")


def _original_as_disk(folder: Path, conf: dict, tensors: dict[str, torch.Tensor], work: Path, revision) -> Path:
    """An original LLaVA checkpoint rewritten as a llava-hf folder in ``work`` (tower from mm_vision_tower)."""
    from transformers import AutoConfig, AutoModel, LlavaConfig

    tower_src = conf.get("mm_vision_tower")
    if not tower_src:
        raise ImportError_(f"{folder}/config.json: no mm_vision_tower naming the vision tower")
    tower_dir = _local(tower_src, None)
    tower = AutoModel.from_pretrained(tower_dir, dtype=torch.float32)
    if hasattr(tower, "vision_model") and hasattr(tower, "text_model"):
        tower = tower.vision_model
    if conf.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
        raise ImportError_(f"mm_projector_type {conf.get('mm_projector_type')!r}: only mlp2x_gelu fits Llava")
    select = conf.get("mm_vision_select_feature", "patch")
    text = {k: v for k, v in conf.items() if not k.startswith("mm_") and k not in ("architectures", "auto_map")}
    text["model_type"] = "llama" if conf.get("model_type", "").startswith("llava") else conf.get("model_type", "llama")
    text_conf = AutoConfig.for_model(**text)
    vconf = AutoConfig.from_pretrained(tower_dir)
    vconf = getattr(vconf, "vision_config", vconf)
    image_token = conf.get("image_token_index", text_conf.vocab_size - 1)
    grid = (vconf.image_size // vconf.patch_size) ** 2  # patches; a CLIP tower adds CLS, "patch" drops it
    n_tokens = grid + (1 if select != "patch" and "clip" in vconf.model_type else 0)
    llava = LlavaConfig(
        vision_config=vconf.to_dict(),
        text_config=text_conf.to_dict(),
        image_token_index=image_token,
        vision_feature_layer=conf.get("mm_vision_select_layer", -2),
        vision_feature_select_strategy="default" if select == "patch" else "full",
        projector_hidden_act="gelu",
        image_seq_length=n_tokens,
    )
    disk: dict[str, torch.Tensor] = {}
    for k, v in tensors.items():
        if k.startswith("model.mm_projector.0."):
            disk["multi_modal_projector.linear_1." + k.split(".")[-1]] = v
        elif k.startswith("model.mm_projector.2."):
            disk["multi_modal_projector.linear_2." + k.split(".")[-1]] = v
        elif k.startswith("model.vision_tower."):
            continue  # the tower comes from mm_vision_tower
        elif k.startswith("model."):
            disk["language_model." + k] = v
        elif k == "lm_head.weight":
            disk["language_model.lm_head.weight"] = v
    for k, v in tower.state_dict().items():
        disk["vision_tower." + (k if k.startswith("vision_model.") else "vision_model." + k)] = v
    from safetensors.torch import save_file

    work.mkdir(parents=True, exist_ok=True)
    (work / "config.json").write_text(json.dumps(llava.to_dict(), indent=2))
    save_file({k: v.contiguous() for k, v in disk.items()}, str(work / "model.safetensors"), metadata={"format": "pt"})
    for f in folder.iterdir():  # tokenizer files
        if f.is_file() and (
            f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json", "chat_template.jinja")
        ):
            shutil.copy(f, work / f.name)
    for name in ("preprocessor_config.json",):
        if (tower_dir / name).is_file():
            shutil.copy(tower_dir / name, work / name)
    return work


def _chat_template(folder: Path, tokenizer) -> str | None:
    """The source's chat template (tokenizer's, else the processor's), with the content-list prelude
    when it renders nothing of a string message."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        for name in ("chat_template.jinja", "chat_template.json"):
            f = folder / name
            if f.is_file():
                text = f.read_text()
                template = json.loads(text).get("chat_template") if name.endswith(".json") else text
                break
    if not template:
        return None
    probe = [{"role": "user", "content": "<image>\nzqxjv probe"}]
    try:
        out = tokenizer.apply_chat_template(probe, chat_template=template, tokenize=False, add_generation_prompt=True)
    except Exception:
        out = ""
    if "zqxjv probe" in out:
        return template
    return _CONTENT_LIST_PRELUDE + template


def import_llava(source: str | Path, out: str | Path, revision: str | None = None, name: str | None = None) -> Path:
    """Write the mmlm checkpoint of a Llava source into ``out`` (see the module docstring)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ImportError_(f"{out} exists and is not empty; choose a new --out")
    folder = _local(source, revision)
    stage = out.parent / f".{out.name}.import"  # parts and work files until the checkpoint is in place
    shutil.rmtree(stage, ignore_errors=True)
    try:
        return _import(folder, source, out, stage, revision, name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _import(folder: Path, source, out: Path, stage: Path, revision, name) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlavaForConditionalGeneration

    from mmlm.config import parse_config
    from mmlm.model import build

    conf_file = folder / "config.json"
    if not conf_file.is_file():
        raise ImportError_(f"{folder}: no config.json")
    conf = json.loads(conf_file.read_text())
    work = stage / "work"
    tensors = _weights(folder)
    layout = layout_of(tensors)
    if layout == "original":
        folder = _original_as_disk(folder, conf, tensors, work, revision)
        conf = json.loads((folder / "config.json").read_text())
    elif conf.get("model_type") != "llava":
        raise ImportError_(f"{folder}/config.json: model_type {conf.get('model_type')!r}, not llava")
    del tensors

    hf = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    lconf = hf.config
    act = ACTIVATION.get(lconf.projector_hidden_act)
    if act is None:
        raise ImportError_(
            f"projector_hidden_act {lconf.projector_hidden_act!r} has no mmlm equivalent (mlp activations: "
            f"{', '.join(sorted(set(ACTIVATION.values())))})"
        )
    layers = lconf.vision_feature_layer
    layers = list(layers) if isinstance(layers, (list, tuple)) else [layers]
    strategy = lconf.vision_feature_select_strategy

    parts = stage / "parts"
    vision_dir, llm_dir = parts / "vision", parts / "llm"
    hf.model.vision_tower.save_pretrained(vision_dir)
    pp = folder / "preprocessor_config.json"
    if pp.is_file():
        shutil.copy(pp, vision_dir / "preprocessor_config.json")
    causal = AutoModelForCausalLM.from_config(lconf.text_config, dtype=torch.float32)
    state = {f"model.{k}": v for k, v in hf.model.language_model.state_dict().items()}
    state["lm_head.weight"] = hf.lm_head.weight
    missing, unexpected = causal.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and causal.config.tie_word_embeddings)]
    if missing or unexpected:
        raise ImportError_(
            f"the language model's weights do not fit its config: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    causal.save_pretrained(llm_dir)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    template = _chat_template(folder, tokenizer)
    if template:
        tokenizer.chat_template = template
    tokenizer.save_pretrained(llm_dir)

    raw: dict[str, Any] = {
        "name": name or Path(str(source)).name,
        "model": {
            "encoders": {
                "image": {
                    "type": "hf",
                    "path": "parts/vision",
                    "select_layers": layers,
                    "drop_prefix_tokens": strategy == "default",
                }
            },
            "connectors": {
                "image": {
                    "type": "mlp",
                    "depth": 2,
                    "activation": act,
                    **({"fusion": "concat"} if len(layers) > 1 else {}),
                }
            },
            "llm": {"type": "hf", "path": "parts/llm"},
        },
    }
    if len(layers) > 1:  # Llava concatenates the layers' features, in its order
        raw["model"]["connectors"]["image"]["fusion"] = "concat"
    from mmlm.config import resolve_relative_paths

    resolved = json.loads(json.dumps(raw))
    resolve_relative_paths(resolved, stage)
    model = build(parse_config(resolved))
    n_tokens = model.encoders["image"].num_tokens
    if getattr(lconf, "image_seq_length", None) and lconf.image_seq_length != n_tokens:
        raise ImportError_(
            f"the tower gives {n_tokens} image tokens but the source says image_seq_length {lconf.image_seq_length}"
        )
    proj = hf.model.multi_modal_projector
    net = [m for n, m in model.connectors["image"].named_modules() if n.endswith("net")][0]
    with torch.no_grad():
        for mine, theirs in ((net[0], proj.linear_1), (net[2], proj.linear_2)):
            if mine.weight.shape != theirs.weight.shape:
                raise ImportError_(
                    f"projector {tuple(theirs.weight.shape)} does not fit mmlm's mlp {tuple(mine.weight.shape)}"
                )
            mine.weight.copy_(theirs.weight)
            if theirs.bias is not None:
                mine.bias.copy_(theirs.bias)
            else:  # multimodal_projector_bias: false -> an mlp with zero biases computes the same
                mine.bias.zero_()
    model.save(out)
    shutil.move(str(parts), str(out / "parts"))
    # the saved config names the parts where they were built; the checkpoint names them relative to
    # itself, so the folder can move
    import yaml

    cfg_file = out / "mmlm.yaml"
    saved = yaml.safe_load(cfg_file.read_text())
    saved["model"]["encoders"]["image"]["path"] = "parts/vision"
    saved["model"]["llm"]["path"] = "parts/llm"
    cfg_file.write_text(yaml.safe_dump(saved, sort_keys=False))
    return out
