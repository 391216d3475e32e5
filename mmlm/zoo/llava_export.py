"""``mmlm export CKPT --format hf-llava --out DIR``: an mmlm model as a transformers Llava folder.

The folder loads with ``AutoModelForImageTextToText.from_pretrained(DIR)`` and
``AutoProcessor.from_pretrained(DIR)`` and answers through transformers' own ``generate`` as mmlm
does (see ../shared/CONVENTIONS.md, "Hugging Face Llava"). It holds:

- ``config.json`` (``model_type: llava``): the tower's and the LLM's configs, the feature layer(s)
  (mmlm's ``select_layers``: both count ``hidden_states`` with 0 = embeddings), the select strategy
  (``default`` when mmlm drops the tower's one CLS token, ``full`` when it keeps every token or the
  tower has none), the projector's activation, ``image_token_index`` and ``image_seq_length``;
- ``model.safetensors`` in the on-disk layout transformers itself writes (``language_model.model.*``,
  ``language_model.lm_head.weight``, ``vision_tower.*``, ``multi_modal_projector.*``);
- the mmlm tokenizer with ``<image>`` added as a special token (its id is ``image_token_index``; when
  it is beyond the LLM's embedding rows they grow, the new rows zero: Llava writes image features over
  that token's embeddings and never reads them), padding on the left, and a chat template that renders
  exactly what mmlm renders for string messages (``<image>`` inline) and also takes transformers'
  content lists (``[{"type": "image"}, {"type": "text", "text": ...}]``), joined as mmlm's API joins them;
- the image processor (``CLIPImageProcessor``: resize to the encoder's size with its resample, no
  crop, rescale, the encoder's mean and std) in a ``LlavaProcessor`` that expands ``<image>`` to the
  encoder's token count;
- ``generation_config.json``: mmlm's stop tokens as ``eos_token_id``, greedy, and the image token
  suppressed (a grown vocabulary row must never be generated: mmlm's LLM has no such row);
- ``README.md``: a model card with the mmlm config.

Pixels: transformers picks its torchvision image backend by default, whose bicubic resize differs from
PIL's (mmlm's) by up to 2/255 before normalisation; ``AutoProcessor.from_pretrained(DIR,
backend="pil")`` gives mmlm's pixel values exactly.

What cannot be a Llava is refused with a ValueError naming the part and why: Llava is one image
tower of transformers (CLIP/SigLIP-like, ``hidden_states`` of a ViT), its features taken at one layer
or concatenated over several, optionally without the first (CLS) token, then ``Linear -> act ->
Linear`` with biases, written over the image token's positions of any causal LM.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from mmlm.modalities import IMAGE_PLACEHOLDER

IMAGE_TOKEN = IMAGE_PLACEHOLDER  # Llava's image token is the text mmlm writes for an image: "<image>"
# mmlm's mlp activations -> transformers' ACT2FN names with the same numerics (checked at export)
ACTIVATIONS = {nn.GELU: "gelu", nn.ReLU: "relu", nn.SiLU: "silu", nn.Tanh: "tanh"}
_PIL_RESAMPLE = {"nearest": 0, "bilinear": 2, "bicubic": 3}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LlavaPlan:
    """How an mmlm model maps onto Llava (``llava_plan``)."""

    encoder: Any  # mmlm.vision.hf_encoder.HFEncoder
    tower: nn.Module  # the transformers vision model inside it
    linear_1: nn.Linear
    linear_2: nn.Linear
    activation: str  # ACT2FN name
    feature_layer: int | list[int]
    strategy: str  # "default" (drop the first token) or "full"
    num_additional_image_tokens: int  # prefix tokens the tower puts before its patches (CLS: 1)
    patch_size: int
    image_size: tuple[int, int]  # (H, W)
    num_tokens: int  # image tokens per image


def _refuse(where: str, why: str) -> ValueError:
    return ValueError(f"{where}: {why}; it cannot be exported as llava")


# ---------------------------------------------------------------------------------------------- checks


def llava_plan(model) -> LlavaPlan:
    """Check that ``model`` (a ``MultimodalLM``) is a Llava and say how its parts map; a ValueError
    names the first part that does not fit and why."""
    from mmlm.connectors._base import FusedConnector
    from mmlm.connectors._fusion import ConcatFusion
    from mmlm.vision.hf_encoder import HFEncoder

    mcfg = model.config.model
    if list(mcfg.encoders) != ["image"]:
        names = ", ".join(mcfg.encoders) or "none"
        raise _refuse("model.encoders", f"Llava has exactly one image encoder, this model has: {names}")
    comp = mcfg.encoders["image"]
    enc = model.encoders["image"]
    if comp.type != "hf" or not isinstance(enc, HFEncoder):
        raise _refuse(
            "model.encoders.image",
            f"type {comp.type} is not a transformers vision model (Llava's tower is one: use type hf, "
            "a CLIP/SigLIP-like model)",
        )
    if mcfg.media_position:
        raise _refuse("model.media_position", "learned media positions are added after the projector; Llava has none")
    if getattr(enc, "_fwd_kwargs", None):
        raise _refuse(
            "model.encoders.image.image_size",
            f"the tower runs at {list(enc.preprocess.size)} px with interpolated position embeddings; "
            "Llava runs its tower at the size of its config",
        )
    tower = enc.model
    vconf = tower.config
    patch = getattr(vconf, "patch_size", None)
    if not isinstance(patch, int):
        raise _refuse("model.encoders.image", f"the tower's patch_size is {patch!r}; Llava needs one square patch size")
    H, W = enc.preprocess.size
    # the tower's own token count (before mmlm drops any): prefix tokens are those beyond the patch grid
    with torch.no_grad():
        p = next(tower.parameters())
        hidden = tower(
            pixel_values=torch.zeros(1, 3, H, W, dtype=p.dtype, device=p.device), output_hidden_states=True
        ).hidden_states
    if hidden is None or hidden[0].ndim != 3:
        raise _refuse("model.encoders.image", "the tower does not give [B, N, D] hidden states (a ViT)")
    grid = (H // patch) * (W // patch)
    prefix = int(hidden[0].shape[1]) - grid
    if prefix < 0:
        raise _refuse("model.encoders.image", f"the tower gives {hidden[0].shape[1]} tokens for a grid of {grid}")
    if enc.drop_prefix_tokens and prefix > 1:
        raise _refuse(
            "model.encoders.image.drop_prefix_tokens",
            f"the tower has {prefix} prefix tokens (CLS and registers) and mmlm drops them all; Llava's "
            "'default' strategy drops only the first",
        )
    if enc.drop_prefix_tokens and prefix == 1:
        strategy = "default"
    else:  # no prefix tokens to drop, or mmlm keeps them all
        strategy = "full"
    n_llava = grid + prefix - (1 if strategy == "default" else 0)
    if n_llava != enc.num_tokens:
        raise _refuse(
            "model.encoders.image",
            f"Llava's processor would expand <image> to {n_llava} tokens but the encoder gives {enc.num_tokens}",
        )
    layers = list(enc.select_layers)
    n_hidden = len(hidden)
    for i in layers:
        if not -n_hidden <= i < n_hidden:
            raise _refuse(
                "model.encoders.image.select_layers", f"{i} is not one of the tower's {n_hidden} hidden states"
            )

    conn = model.connectors["image"]
    ccomp = mcfg.connectors["image"]
    where = "model.connectors.image"
    if ccomp.type != "mlp":
        raise _refuse(where, f"type {ccomp.type} is not Llava's projector (Linear -> act -> Linear)")
    if len(layers) > 1:
        if not (isinstance(conn, FusedConnector) and isinstance(conn.fusion, ConcatFusion)):
            fusion = getattr(getattr(conn, "fusion", None), "__class__", type(None)).__name__
            raise _refuse(
                f"{where}.fusion",
                f"{len(layers)} encoder layers merged by {fusion}; Llava concatenates them (fusion: concat)",
            )
        conn = conn.inner
    opts = ccomp.parsed(_connectors(), where)
    if opts.layernorm:
        raise _refuse(f"{where}.layernorm", "a LayerNorm before the projector; Llava's projector has none")
    if opts.pool != 1:
        raise _refuse(f"{where}.pool", f"{opts.pool}: tokens pooled before the projector; Llava's projector reads each")
    if opts.depth != 2:
        raise _refuse(
            f"{where}.depth", f"{opts.depth} Linear layers; Llava's projector is exactly two (Linear -> act -> Linear)"
        )
    net = getattr(conn, "net", None)
    mods = list(net) if isinstance(net, nn.Sequential) else []
    if not (len(mods) == 3 and isinstance(mods[0], nn.Linear) and isinstance(mods[2], nn.Linear)):
        raise _refuse(where, "the projector is not Linear -> act -> Linear")
    lin1, act, lin2 = mods
    width = int(model.llm.get_input_embeddings().weight.shape[1])
    if lin1.out_features != width:
        raise _refuse(
            f"{where}.hidden_dim",
            f"{lin1.out_features} between the Linear layers; Llava's projector is as wide as the LLM ({width})",
        )
    if lin1.bias is None or lin2.bias is None:
        raise _refuse(where, "a Linear without bias; the export writes multimodal_projector_bias: true")
    name = ACTIVATIONS.get(type(act))
    if name == "gelu" and getattr(act, "approximate", "none") != "none":
        name = None
    if name is None or not _same_activation(act, name):
        raise _refuse(f"{where}.activation", f"{act} has no transformers activation with the same numerics")

    _check_llm(model.llm)
    return LlavaPlan(
        encoder=enc,
        tower=tower,
        linear_1=lin1,
        linear_2=lin2,
        activation=name,
        feature_layer=layers[0] if len(layers) == 1 else layers,
        strategy=strategy,
        num_additional_image_tokens=prefix,
        patch_size=patch,
        image_size=(H, W),
        num_tokens=enc.num_tokens,
    )


def _connectors():
    from mmlm.registry import CONNECTORS

    return CONNECTORS


def _same_activation(module: nn.Module, name: str) -> bool:
    from transformers.activations import ACT2FN

    x = torch.linspace(-8, 8, 1601)
    return torch.equal(ACT2FN[name](x), module(x))


def _check_llm(llm) -> None:
    """Llava runs ``AutoModel.from_config(text_config)`` and then its own ``lm_head`` (a Linear without
    bias): the LLM must be that base model under that head, and compute nothing more for its logits
    (Gemma's softcapping, logit scales)."""
    from transformers import AutoModel, PreTrainedModel

    where = "model.llm"
    if not isinstance(llm, PreTrainedModel):
        raise _refuse(where, f"{type(llm).__name__} is not a transformers causal LM")
    head = llm.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise _refuse(where, "the LLM has no Linear output head")
    if head.bias is not None:
        raise _refuse(where, "the LLM's output head has a bias; Llava's lm_head has none")
    with torch.device("meta"):
        theirs = type(AutoModel.from_config(copy.deepcopy(llm.config)))
    base = llm.base_model
    if theirs is not type(base):
        raise _refuse(
            where,
            f"its base model is {type(base).__name__} but transformers builds {theirs.__name__} from its config",
        )
    rows = llm.get_input_embeddings().weight.shape[0]
    ids = torch.arange(3, device=head.weight.device).remainder(rows).unsqueeze(0)
    with torch.no_grad():
        full = llm(input_ids=ids, use_cache=False).logits.float()
        mine = head(base(input_ids=ids, use_cache=False).last_hidden_state).float()
    if not torch.allclose(full, mine, rtol=1e-4, atol=1e-4 * float(full.abs().max().clamp(min=1))):
        raise _refuse(
            where,
            "its logits are not its output head applied to its last hidden state (softcapping or a logit "
            "scale?); Llava's lm_head is the head alone",
        )


# ---------------------------------------------------------------------------------------------- parts


def llava_tokenizer(model):
    """A copy of the model's tokenizer with ``<image>`` as a special token (whole in any text) and
    left padding (generation); returns it and the image token id."""
    from tokenizers import AddedToken

    tok = copy.deepcopy(model.tokenizer)
    tok.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False, lstrip=False, rstrip=False)])
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    if tok.encode(IMAGE_TOKEN, add_special_tokens=False) != [image_id]:
        raise _refuse("model.llm tokenizer", f"it does not keep {IMAGE_TOKEN} as one token after adding it")
    tok.padding_side = "left"
    tok.init_kwargs["padding_side"] = "left"  # what save_pretrained writes
    return tok, int(image_id)


def llava_config(model, image_token_id: int, plan: LlavaPlan | None = None, dtype: torch.dtype | None = None):
    """The ``LlavaConfig`` of ``model`` with ``image_token_id`` (its vocabulary grown to hold it)."""
    from transformers import LlavaConfig

    plan = plan or llava_plan(model)
    llm = model.llm
    text_config = copy.deepcopy(llm.config)
    rows = int(llm.get_input_embeddings().weight.shape[0])
    text_config.vocab_size = max(rows, image_token_id + 1)
    vision_config = copy.deepcopy(plan.tower.config)
    dtype = dtype or llm.get_input_embeddings().weight.dtype
    config = LlavaConfig(
        vision_config=vision_config.to_dict(),
        text_config=text_config.to_dict(),
        image_token_index=image_token_id,
        projector_hidden_act=plan.activation,
        vision_feature_layer=plan.feature_layer,
        vision_feature_select_strategy=plan.strategy,
        image_seq_length=plan.num_tokens,
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(getattr(llm.config, "tie_word_embeddings", False)),
    )
    config.dtype = dtype
    config.text_config.dtype = dtype
    config.vision_config.dtype = dtype
    return config


def build_llava(
    model,
    image_token_id: int | None = None,
    dtype: torch.dtype | str | None = None,
    plan: LlavaPlan | None = None,
):
    """A ``LlavaForConditionalGeneration`` holding ``model``'s weights (shared with it where no
    dtype change or new vocabulary row needs a copy), in eval mode on the LLM's device; returns it
    and its image token id (default: the id ``<image>`` gets in ``llava_tokenizer``). Rows added for
    the image token are zero (nothing reads them; ``generation_config`` suppresses the token)."""
    from transformers import LlavaForConditionalGeneration

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights

    plan = plan or llava_plan(model)
    if image_token_id is None:
        image_token_id = llava_tokenizer(model)[1]
    if isinstance(dtype, str):
        dtype = _DTYPES[dtype]
    llm = model.llm
    dtype = dtype or llm.get_input_embeddings().weight.dtype
    config = llava_config(model, image_token_id, plan, dtype)
    # each part keeps the attention kernel it runs with in mmlm
    config.vision_config._attn_implementation = plan.tower.config._attn_implementation or "sdpa"
    config.text_config._attn_implementation = llm.config._attn_implementation or "sdpa"
    with no_init_weights():
        hf = LlavaForConditionalGeneration(config)

    def cast(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.detach().to(dtype) if v.is_floating_point() else v.detach() for k, v in state.items()}

    def put(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
        missing, unexpected = module.load_state_dict(state, strict=False, assign=True)
        if missing or unexpected:
            raise _refuse(what, f"its weights do not fit Llava's: missing {missing[:3]}, unexpected {unexpected[:3]}")

    inner = hf.model
    put(inner.vision_tower, cast(_tower_state(plan.tower, inner.vision_tower)), "model.encoders.image")
    for theirs, mine in (
        (inner.multi_modal_projector.linear_1, plan.linear_1),
        (inner.multi_modal_projector.linear_2, plan.linear_2),
    ):
        put(theirs, cast(mine.state_dict()), "model.connectors.image")
    base = cast(llm.base_model.state_dict())
    emb_key = _key_of(llm.base_model, llm.get_input_embeddings().weight)
    rows = config.text_config.vocab_size
    base[emb_key] = _grow(base[emb_key], rows)
    put(inner.language_model, base, "model.llm")
    if config.tie_word_embeddings:
        hf.lm_head.weight = inner.language_model.get_input_embeddings().weight
    else:
        head = _grow(llm.get_output_embeddings().weight.detach().to(dtype), rows)
        hf.lm_head.weight = nn.Parameter(head, requires_grad=hf.lm_head.weight.requires_grad)
    hf.to(llm.get_input_embeddings().weight.device)
    hf.generation_config = _generation_config(model, image_token_id)
    return hf.eval(), image_token_id


def _tower_state(tower: nn.Module, theirs: nn.Module) -> dict[str, torch.Tensor]:
    """The tower's weights under the names of Llava's tower, which may differ by a ``vision_model.``
    prefix (a full dual-tower model's vision half; transformers versions that nest the tower)."""
    state = tower.state_dict()
    want = set(theirs.state_dict())
    pre = "vision_model."
    for renamed in (
        state,
        {pre + k: v for k, v in state.items()},
        {k.removeprefix(pre): v for k, v in state.items()},
    ):
        if set(renamed) == want:
            return renamed
    return state  # the mismatch is reported by the caller


def _key_of(module: nn.Module, tensor: torch.Tensor) -> str:
    for k, v in module.state_dict(keep_vars=True).items():
        if v is tensor:
            return k
    raise _refuse("model.llm", "its input embeddings are not among its base model's weights")


def _grow(weight: torch.Tensor, rows: int) -> torch.Tensor:
    if weight.shape[0] >= rows:
        return weight
    return torch.cat([weight, weight.new_zeros(rows - weight.shape[0], *weight.shape[1:])])


def _generation_config(model, image_token_id: int):
    """Greedy decoding that stops where mmlm's ``generate`` stops, the image token suppressed."""
    from transformers import GenerationConfig

    tok = model.tokenizer
    stops = sorted(model.processor.stop_token_ids())
    return GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=stops if len(stops) > 1 else (stops[0] if stops else None),
        pad_token_id=model.processor.pad_token_id,
        do_sample=False,
        suppress_tokens=[image_token_id],
    )


def llava_image_processor(model, plan: LlavaPlan | None = None):
    """``CLIPImageProcessor`` reproducing the encoder's transform (``mmlm.vision._base.ImageTransform``
    with ``processor.resize: squash``): resize to (H, W) with its resample, rescale, normalise."""
    from transformers import CLIPImageProcessor

    plan = plan or llava_plan(model)
    resize = model.processor.config.resize
    if resize != "squash":
        raise _refuse(
            "processor.resize",
            f"{resize!r} fits the image to the encoder's aspect before resizing; Llava's image processors "
            "reproduce only 'squash' exactly",
        )
    t = plan.encoder.preprocess
    resample = int(t.resample)  # a PIL code: 0 nearest, 2 bilinear, 3 bicubic
    if resample not in _PIL_RESAMPLE.values():
        raise _refuse("model.encoders.image", f"resample {t.resample} is not nearest, bilinear or bicubic")
    H, W = t.size
    return CLIPImageProcessor(
        do_resize=True,
        size={"height": H, "width": W},
        resample=resample,
        do_center_crop=False,
        crop_size={"height": H, "width": W},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[float(x) for x in t.mean.flatten().tolist()],
        image_std=[float(x) for x in t.std.flatten().tolist()],
        do_convert_rgb=True,
    )


def llava_processor(model, plan: LlavaPlan | None = None):
    """The ``LlavaProcessor`` of the export: image processor, tokenizer (``<image>`` added) and the
    chat template; returns it and the image token id."""
    from transformers import LlavaProcessor

    plan = plan or llava_plan(model)
    tok, image_id = llava_tokenizer(model)
    template = llava_chat_template(model)
    tok.chat_template = template
    proc = LlavaProcessor(
        image_processor=llava_image_processor(model, plan),
        tokenizer=tok,
        patch_size=plan.patch_size,
        vision_feature_select_strategy=plan.strategy,
        chat_template=template,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=plan.num_additional_image_tokens,
    )
    return proc, image_id


# ---------------------------------------------------------------------------------------------- chat template


def _lit(s: str) -> str:
    """``s`` as a Jinja string literal (ASCII only: anything else as a \\U escape)."""
    return '"' + "".join(c if 32 <= ord(c) < 127 and c not in '\\"' else f"\\U{ord(c):08x}" for c in s) + '"'


def _prelude(system_prompt: str | None) -> str:
    """Jinja that rebuilds ``messages`` with string contents, as mmlm takes them: a content list's
    text parts and images (``<image>``, on a line of its own, as ``mmlm.serve.api._join`` writes it)
    joined; and mmlm's ``processor.system_prompt`` in front when no message is a system one."""
    img = _lit(IMAGE_TOKEN)
    lines = [
        "{%- set _mmlm = namespace(msgs=[], system=false) -%}",
        "{%- for m in messages -%}{%- if m['role'] == 'system' -%}{%- set _mmlm.system = true -%}"
        "{%- endif -%}{%- endfor -%}",
    ]
    if system_prompt:
        lines.append(
            "{%- if not _mmlm.system -%}{%- set _mmlm.msgs = [{'role': 'system', 'content': "
            + _lit(system_prompt)
            + "}] -%}{%- endif -%}"
        )
    lines += [
        "{%- for m in messages -%}",
        "{%- if m['content'] is string -%}{%- set _mmlm.msgs = _mmlm.msgs + [m] -%}",
        "{%- else -%}",
        "{%- set _t = namespace(s='') -%}",
        "{%- for part in (m['content'] if m['content'] is not none else []) -%}",
        "{%- if part is string -%}{%- set _t.s = _t.s + part -%}",
        "{%- elif part['type'] in ['image', 'image_url'] -%}",
        "{%- if _t.s and not _t.s.endswith('\\n') -%}{%- set _t.s = _t.s + '\\n' -%}{%- endif -%}",
        "{%- set _t.s = _t.s + " + img + " + '\\n' -%}",
        "{%- elif part['type'] == 'text' -%}{%- set _t.s = _t.s + part['text'] -%}",
        "{%- else -%}{{- raise_exception('content parts of type ' + part['type'] + ' are not supported: "
        "use text and image') -}}",
        "{%- endif -%}",
        "{%- endfor -%}",
        "{%- if _t.s.endswith(" + img + " + '\\n') -%}{%- set _t.s = _t.s[:-1] -%}{%- endif -%}",
        "{%- set _mmlm.msgs = _mmlm.msgs + [dict(m, content=_t.s)] -%}",
        "{%- endif -%}",
        "{%- endfor -%}",
        # a block tag then one newline: trim_blocks drops exactly that newline, so the template after
        # it starts at the beginning of a line as it would alone
        "{%- set messages = _mmlm.msgs %}\n",
    ]
    return "\n".join(lines)


def _builtin_template(bos: str | None) -> str:
    """mmlm's built-in markers (``mmlm.processor.Processor._builtin_segments``) as Jinja."""
    from mmlm.llm import CHAT_MARKERS

    roles = ", ".join(f"{_lit(r)}: {_lit(CHAT_MARKERS[r])}" for r in ("system", "user", "assistant"))
    end = _lit(CHAT_MARKERS["end"])
    return (
        "{%- set _markers = {"
        + roles
        + "} -%}"
        + ("{{- " + _lit(bos) + " -}}" if bos else "")
        + "{%- for m in messages -%}"
        "{%- if m['role'] not in _markers -%}"
        "{{- raise_exception('role ' + m['role'] + ' is not supported: use system, user or assistant') -}}"
        "{%- endif -%}"
        "{{- _markers[m['role']] + '\\n' + m['content'] + " + end + " + '\\n' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- " + _lit(CHAT_MARKERS["assistant"] + "\n") + " -}}{%- endif -%}"
    )


def llava_chat_template(model) -> str:
    """A chat template that renders what mmlm's processor renders for string messages (the tokenizer's
    own template when mmlm uses it, else mmlm's built-in markers) and takes content lists too."""
    proc = model.processor
    body = proc.tokenizer.chat_template if proc.use_template else _builtin_template(proc.tokenizer.bos_token)
    if not isinstance(body, str):
        raise _refuse("model.llm tokenizer", "its chat template is not one Jinja string")
    return _prelude(proc.config.system_prompt) + body


# ---------------------------------------------------------------------------------------------- card


def _sources(model) -> list[str]:
    """The pretrained sources the model names (hub ids or paths) for the card's ``base_model``."""
    out = []
    llm = model.config.model.llm
    enc = model.config.model.encoders.get("image")
    for comp in (llm, enc):
        path = (comp.options() or {}).get("path") if comp is not None else None
        if isinstance(path, str) and path and not path.startswith("pkg://"):
            out.append(path)
    return out


def model_card(model, plan: LlavaPlan, image_token_id: int, license: str = "other") -> str:
    front: dict[str, Any] = {"license": license}
    base = _sources(model)
    if base:
        front["base_model"] = base
    front.update({"library_name": "transformers", "pipeline_tag": "image-text-to-text", "tags": ["mmlm", "llava"]})
    layer = plan.feature_layer
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).rstrip(),
        "---",
        "",
        f"# {model.config.name}",
        "",
        "A multimodal LLM assembled with mmlm, exported as a transformers Llava (`LlavaForConditionalGeneration`): "
        "it answers through transformers' `generate` as it does in mmlm.",
        "",
        f"- vision tower: `{plan.tower.config.model_type}`, {plan.image_size[0]}x{plan.image_size[1]} px, "
        f"patch {plan.patch_size}, features of layer {layer} (`vision_feature_select_strategy: {plan.strategy}`), "
        f"{plan.num_tokens} image tokens per image",
        f"- projector: Linear -> {plan.activation} -> Linear",
        f"- language model: `{model.llm.config.model_type}`; image token `{IMAGE_TOKEN}` = id {image_token_id}",
        "",
        "```python",
        "from transformers import AutoModelForImageTextToText, AutoProcessor",
        "",
        'model = AutoModelForImageTextToText.from_pretrained("PATH")',
        "# backend='pil' resizes images exactly as mmlm does (the default torchvision backend differs slightly)",
        'processor = AutoProcessor.from_pretrained("PATH", backend="pil")',
        'messages = [{"role": "user", "content": [{"type": "image", "image": image}, '
        '{"type": "text", "text": "What is in the picture?"}]}]',
        "inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, "
        'return_dict=True, return_tensors="pt")',
        "out = model.generate(**inputs, max_new_tokens=64)",
        "print(processor.decode(out[0, inputs['input_ids'].shape[1]:], skip_special_tokens=True))",
        "```",
        "",
        "## mmlm config",
        "",
        "```yaml",
        yaml.safe_dump(model.config.to_dict(), sort_keys=False).rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- export


def export_llava(
    source,
    out_dir,
    *,
    license: str = "other",
    dtype: str | None = None,
    overwrite: bool = False,
    merge_lora: bool = False,
) -> Path:
    """Write ``source`` (a checkpoint directory, loaded with ``mmlm.checkpoint.load``, or a
    ``MultimodalLM``) into ``out_dir`` as a transformers Llava folder (see the module docstring);
    returns ``out_dir``. ``dtype`` (float32, bfloat16, float16): the weights' dtype, default the LLM's.
    A model that is not a Llava is refused with a ValueError naming the part; an existing non-empty
    ``out_dir`` is refused unless ``overwrite``. A model with LoRA adapters is exported with them
    folded into its weights (``merge_lora``; refused without it: Llava has no adapters)."""
    from mmlm.storage import atomic_dir, refuse_nonempty

    out = Path(out_dir)
    refuse_nonempty(out, overwrite)
    if dtype is not None and dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {', '.join(_DTYPES)}")
    model = _as_model(source)
    if model.lora:
        if not merge_lora:
            raise ValueError(
                f"the model carries LoRA adapters on {', '.join(model.lora)}, which a Llava folder cannot hold; "
                "export with --merge-lora to fold them into the weights"
            )
        from mmlm.train.lora import merge_lora as merge

        merge(model)
    plan = llava_plan(model)
    processor, image_id = llava_processor(model, plan)
    hf, _ = build_llava(model, image_id, dtype, plan)
    with atomic_dir(out) as tmp:
        hf.save_pretrained(str(tmp), state_dict=_on_disk_state(hf))
        processor.save_pretrained(str(tmp))
        # transformers 5 nests the image processor in processor_config.json; older readers (and tools
        # that take the tower's preprocessing from the folder) read preprocessor_config.json
        processor.image_processor.save_pretrained(str(tmp))
        (tmp / "README.md").write_text(model_card(model, plan, image_id, license), encoding="utf-8")
    return out


def _on_disk_state(hf) -> dict[str, torch.Tensor]:
    """``hf``'s weights with the tower nested under ``vision_model.`` where transformers' legacy layout
    (every llava-hf repo, transformers 4) has it: transformers 5 keeps CLIP/SigLIP towers flat in
    memory and writes a model it did not load flat; given these names, its save reverses only the
    Llava renaming (``model.vision_tower`` -> ``vision_tower``), and its load removes the nesting."""
    state = hf.state_dict()
    prefix = _legacy_tower_prefix(hf.model.vision_tower)
    if not prefix:
        return state
    head = "model.vision_tower."
    return {(head + prefix + k[len(head) :] if k.startswith(head) else k): v for k, v in state.items()}


def _legacy_tower_prefix(tower: nn.Module) -> str:
    if any(k.startswith("vision_model.") for k in tower.state_dict()):
        return ""  # nested in memory already: saved as it is
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
        from transformers.core_model_loading import PrefixChange
    except ImportError:  # pragma: no cover - transformers before the conversion mappings
        return ""
    for t in get_checkpoint_conversion_mapping(type(tower).__name__) or []:
        if isinstance(t, PrefixChange) and getattr(t, "prefix_to_remove", None) == "vision_model":
            return "vision_model."
    return ""


def _as_model(source):
    from mmlm.model import MultimodalLM

    if isinstance(source, MultimodalLM):
        return source
    if isinstance(source, (str, Path)):
        from mmlm.checkpoint import load

        return load(source)
    raise TypeError(f"export_llava takes a checkpoint directory or a MultimodalLM, not {type(source).__name__}")


__all__ = [
    "LlavaPlan",
    "build_llava",
    "export_llava",
    "llava_chat_template",
    "llava_config",
    "llava_image_processor",
    "llava_plan",
    "llava_processor",
    "llava_tokenizer",
    "model_card",
]
