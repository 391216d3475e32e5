"""Chat template, placeholder expansion, label masking, batching and padding.

Each ``<image>`` in a user turn becomes exactly ``num_tokens`` placeholder ids (a negative id that
never reaches the LLM's embedding table); the model later writes the connector's output at those
positions. Labels are -100 everywhere but the assistant turns. A sample longer than ``max_length``
is rejected with its index: it is never truncated, so a media run can never be cut.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from mmlm.config import ProcessorConfig
from mmlm.errors import SampleError, SampleTooLong
from mmlm.llm import CHAT_MARKERS
from mmlm.modalities import MODALITIES

IGNORE_INDEX = -100
_CONTENT_MARK = "\x00mmlm-assistant-content\x00"  # locates an assistant turn's content in the template output


@dataclass
class MediaSpec:
    placeholder: str  # the text marker in messages, e.g. "<image>"
    token_id: int  # negative id written into input_ids, e.g. -200
    num_tokens: int  # how many LLM positions one item occupies
    transform: Callable[[Any], torch.Tensor]  # raw item (PIL image) -> tensor the encoder takes
    batch_key: str  # where collate puts the stacked tensors, e.g. "pixel_values"
    # images cut into tiles (mmlm/vision/tiling.py): one run of num_tokens placeholders per tile
    tiling: Any = None

    @classmethod
    def of(cls, modality: str, num_tokens: int, transform, tiling=None) -> MediaSpec:
        m = MODALITIES[modality]
        return cls(m.placeholder, m.token_id, num_tokens, transform, m.batch_key, tiling)

    @property
    def tile_size(self) -> int:
        h, w = self.transform.size
        if h != w:
            raise ValueError(f"tiling needs a square encoder input, not {h}x{w}")
        return h

    def tiles_of(self, size: tuple[int, int]) -> int:
        """How many encoder inputs an item of ``size`` (width, height) becomes."""
        from mmlm.vision.tiling import tile_count

        return 1 if self.tiling is None else tile_count(size[0], size[1], self.tile_size, self.tiling)


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    media: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    meta: dict[str, list[Any]] = field(default_factory=dict)


class Processor:
    def __init__(self, tokenizer, media: dict[str, MediaSpec], config: ProcessorConfig | None = None):
        self.tokenizer = tokenizer
        self.media = media
        self.config = config or ProcessorConfig()
        self.use_template = self.config.chat_template == "auto" and bool(getattr(tokenizer, "chat_template", None))
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        fast = getattr(tokenizer, "is_fast", False) and not getattr(tokenizer, "split_special_tokens", False)
        self._backend = getattr(tokenizer, "backend_tokenizer", None) if fast else None
        # placeholder text -> modality, and a splitter that keeps the placeholders as pieces
        self._markers = {spec.placeholder: name for name, spec in media.items()}
        self._splitter = (
            re.compile("(" + "|".join(re.escape(p) for p in self._markers) + ")") if self._markers else None
        )

    # ------------------------------------------------------------------ text
    def _tok(self, text: str) -> list[int]:
        if not text:
            return []
        if self._backend is not None:  # the Rust tokenizer itself: the same ids, without the wrapper's
            return self._backend.encode(text, add_special_tokens=False).ids  # ~60 us of Python per call
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _segments(self, messages: Sequence[dict], add_generation_prompt: bool) -> list[tuple[str, bool]]:
        """Split the rendered conversation into (text, supervised) pieces."""
        for i, m in enumerate(messages):
            if m.get("role") not in ("system", "user", "assistant"):
                raise SampleError(
                    f"message {i} has role {m.get('role')!r}; expected system, user or assistant", "bad format"
                )
            if not isinstance(m.get("content"), str):
                raise SampleError(f"message {i} has no text 'content'", "bad format")
        if self.config.system_prompt and not any(m["role"] == "system" for m in messages):
            messages = [{"role": "system", "content": self.config.system_prompt}, *messages]
        if self.use_template:
            return self._template_segments(list(messages), add_generation_prompt)
        return self._builtin_segments(messages, add_generation_prompt)

    def _builtin_segments(self, messages, add_generation_prompt):
        segs: list[tuple[str, bool]] = []
        bos = self.tokenizer.bos_token
        if bos:
            segs.append((bos, False))
        for m in messages:
            marker = CHAT_MARKERS[m["role"]]
            if m["role"] == "assistant":
                segs.append((f"{marker}\n", False))
                segs.append((f"{m['content']}{CHAT_MARKERS['end']}", True))
                segs.append(("\n", False))
            else:
                segs.append((f"{marker}\n{m['content']}{CHAT_MARKERS['end']}\n", False))
        if add_generation_prompt:
            segs.append((f"{CHAT_MARKERS['assistant']}\n", False))
        return segs

    def _render(self, messages, add_generation_prompt: bool) -> str:
        if not messages:
            return ""
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def _template_segments(self, messages, add_generation_prompt):
        """Use the tokenizer's own template. Each assistant turn is located by rendering the
        conversation up to it with a marker as its content: everything the template writes before the
        content (a system prompt it injects, the turn header) is context, and the supervised text is
        exactly the content and what the template closes the turn with, whatever the first role."""
        segs: list[tuple[str, bool]] = []
        done = ""
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            probe = self._render([*messages[:i], {**m, "content": _CONTENT_MARK}], add_generation_prompt=False)
            if probe.count(_CONTENT_MARK) != 1:
                raise SampleError(
                    "the tokenizer's chat template does not write an assistant turn's content verbatim, so it "
                    "cannot be located; set processor.chat_template: builtin",
                    "bad template",
                )
            before = probe[: probe.index(_CONTENT_MARK)]
            through = self._render(messages[: i + 1], add_generation_prompt=False)
            if not before.startswith(done) or not through.startswith(before):
                raise SampleError(
                    "the tokenizer's chat template does not render conversations prefix by prefix, so "
                    "assistant turns cannot be located; set processor.chat_template: builtin",
                    "bad template",
                )
            segs.append((before[len(done) :], False))
            segs.append((through[len(before) :], True))
            done = through
        tail = self._render(messages, add_generation_prompt=add_generation_prompt)
        if messages and messages[-1]["role"] == "assistant" and not add_generation_prompt:
            tail = tail if len(tail) > len(done) else done
        if not tail.startswith(done):
            raise SampleError(
                "chat template output is not prefix-stable; set processor.chat_template: builtin", "bad template"
            )
        if len(tail) > len(done):
            segs.append((tail[len(done) :], False))
        return segs

    # ------------------------------------------------------------------ samples
    def encode(
        self,
        messages: Sequence[dict],
        media: dict[str, Sequence[Any]] | None = None,
        *,
        add_generation_prompt: bool = False,
        index: int | None = None,
        meta: dict[str, Sequence[Any]] | None = None,
        segments: list[tuple[str, bool]] | None = None,
    ) -> Encoded:
        """Tokenise one conversation (or ready ``segments``). ``media`` maps a modality to its items in
        order of appearance."""
        media = dict(media or {})
        for name in media:
            if name not in self.media:
                raise SampleError(
                    f"this model has no {name!r} encoder; it takes {sorted(self.media) or 'text only'}",
                    "bad media",
                    index,
                )
        sizes = {name: [_size(it) for it in media.get(name, [])] for name, spec in self.media.items() if spec.tiling}
        ids, labels, used = self._tokens(messages, add_generation_prompt, index, segments, sizes)
        out_media: dict[str, list[torch.Tensor]] = {}
        for name, spec in self.media.items():
            items = list(media.get(name, []))
            if used[name] != len(items):
                raise SampleError(
                    f"{used[name]} {spec.placeholder} placeholder(s) in the text but {len(items)} {name} item(s) given",
                    "media count mismatch",
                    index,
                )
            if items and spec.tiling is not None:
                from mmlm.vision.tiling import tile_image

                tiles = [t for it in items for t in tile_image(it, spec.tile_size, spec.tiling)]
                out_media[name] = [self._tensor(name, spec, t) for t in tiles]
            elif items:
                out_media[name] = [self._tensor(name, spec, it) for it in items]
        if len(ids) > self.config.max_length:
            raise SampleTooLong(len(ids), self.config.max_length, index)
        return Encoded(ids, labels, out_media, {k: list(v) for k, v in (meta or {}).items()})

    def _tensor(self, name: str, spec: MediaSpec, item: Any) -> torch.Tensor:
        """One media item as the encoder takes it; images (and video frames) meet the input size by
        ``processor.resize`` (a tensor is taken as already transformed)."""
        if isinstance(item, torch.Tensor):
            return item
        if name in ("image", "video") and self.config.resize != "squash":
            return spec.transform(item, resize=self.config.resize)
        return spec.transform(item)

    def prompt_segments(self, prompt: str, chat_template: bool) -> tuple[list[tuple[str, bool]], list[int]]:
        """An embedding prompt as segments, and the token ids it must end with: the end of the chat
        template's generation prompt after a user turn holding ``prompt``, or (``chat_template``
        false) the prompt alone followed by the tokenizer's end token, which mmlm appends itself
        rather than trusting the tokenizer to add it."""
        if chat_template:
            segs = self._segments([{"role": "user", "content": prompt}], add_generation_prompt=True)
            return segs, self._tok(segs[-1][0])
        bos = self.tokenizer.bos_token
        eos = self.tokenizer.eos_token_id
        if eos is None:
            raise ValueError("model.embedding.chat_template: false appends the end token, but the tokenizer has none")
        return [*([(bos, False)] if bos else []), (prompt, False)], [int(eos)]

    def encode_prompt(
        self, prompt: str, media: dict[str, Sequence[Any]] | None, chat_template: bool, index: int | None = None
    ) -> Encoded:
        """Tokenise an embedding prompt (see ``prompt_segments``); the sequence is checked to end with
        the token pooling reads."""
        segs, end = self.prompt_segments(prompt, chat_template)
        if not end:
            raise ValueError(
                "the chat template's generation prompt tokenises to nothing, so there is no end token to pool; "
                "set model.embedding.chat_template: false"
            )
        enc = self.encode([], media, index=index, segments=segs)
        if not chat_template:
            enc.input_ids.append(end[0])
            enc.labels.append(IGNORE_INDEX)
        if enc.input_ids[-len(end) :] != end:
            raise SampleError(
                f"the prompt does not end with the token pooling reads ({end[-1]}); the tokenizer changed it",
                "bad template",
                index,
            )
        if len(enc.input_ids) > self.config.max_length:
            raise SampleTooLong(len(enc.input_ids), self.config.max_length, index)
        return enc

    def _tokens(
        self,
        messages: Sequence[dict],
        add_generation_prompt: bool,
        index: int | None,
        segments: list[tuple[str, bool]] | None = None,
        sizes: dict[str, Sequence[tuple[int, int]]] | None = None,
    ):
        """Input ids (placeholder runs expanded), labels, and the number of placeholders per modality.
        A tiled modality needs its items' ``sizes`` (width, height), in order: each item is one run
        of placeholders per tile, after the tile's tag when the tiling has tags."""
        try:
            segs = segments if segments is not None else self._segments(messages, add_generation_prompt)
        except SampleError as err:
            raise SampleError(err.detail, err.reason, index) from None
        ids: list[int] = []
        labels: list[int] = []
        used = {name: 0 for name in self.media}
        for text, supervised in segs:
            for piece in self._splitter.split(text) if self._splitter else [text]:
                if piece in self._markers:
                    if supervised:
                        raise SampleError(
                            f"an assistant turn contains {piece}; media belongs in user turns", "bad format", index
                        )
                    name = self._markers[piece]
                    spec = self.media[name]
                    if spec.tiling is None:
                        ids.extend([spec.token_id] * spec.num_tokens)
                        labels.extend([IGNORE_INDEX] * spec.num_tokens)
                    else:
                        from mmlm.vision.tiling import tile_tags

                        known = (sizes or {}).get(name, ())
                        if used[name] >= len(known):
                            raise SampleError(
                                f"{piece} is tiled: its token count depends on the image's size, and no image "
                                f"was given for placeholder {used[name] + 1}",
                                "media count mismatch",
                                index,
                            )
                        n = spec.tiles_of(known[used[name]])
                        for tag in tile_tags(n, spec.tiling):
                            t = self._tok(tag)
                            ids.extend([*t, *[spec.token_id] * spec.num_tokens])
                            labels.extend([IGNORE_INDEX] * (len(t) + spec.num_tokens))
                    used[name] += 1
                else:
                    t = self._tok(piece)
                    ids.extend(t)
                    labels.extend(t if supervised else [IGNORE_INDEX] * len(t))
        return ids, labels, used

    def count_tokens(self, messages: Sequence[dict], sizes: dict[str, Sequence[tuple[int, int]]] | None = None) -> int:
        """Length of a conversation in LLM positions (media expanded), exactly as ``encode`` builds
        it, without loading media (a tiled modality needs its items' ``sizes``, read from headers)."""
        return len(self._tokens(messages, False, None, sizes=sizes)[0])

    def count_prompt_tokens(self, prompt: str, chat_template: bool) -> int:
        """Length of an embedding prompt in LLM positions (media expanded), exactly as
        ``encode_prompt`` builds it, without loading media."""
        segs, _ = self.prompt_segments(prompt, chat_template)
        return len(self._tokens([], False, None, segs)[0]) + (0 if chat_template else 1)

    def collate(self, samples: Sequence[Encoded], padding_side: str | None = None) -> dict[str, Any]:
        """Pad and stack encoded samples into a batch with transformers' keys: ``input_ids``,
        ``attention_mask``, ``position_ids``, ``labels`` (-100 off the assistant turns), one tensor per
        modality under its batch key (``pixel_values`` ``[items, 3, H, W]`` for images,
        ``pixel_values_videos`` ``[items, frames, 3, H, W]`` for videos, items in order of appearance),
        and ``media_meta``: per-item annotations by key (``patch_labels``), in that order."""
        side = padding_side or self.config.padding_side
        width = max(len(s.input_ids) for s in samples)
        B = len(samples)
        input_ids = torch.full((B, width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((B, width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((B, width), dtype=torch.long)
        for i, s in enumerate(samples):
            n = len(s.input_ids)
            sl = slice(width - n, width) if side == "left" else slice(0, n)
            input_ids[i, sl] = torch.tensor(s.input_ids, dtype=torch.long)
            labels[i, sl] = torch.tensor(s.labels, dtype=torch.long)
            mask[i, sl] = 1
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        batch: dict[str, Any] = {
            "input_ids": input_ids,
            "labels": labels,
            "attention_mask": mask,
            "position_ids": position_ids,
        }
        self._add_media(batch, samples)
        return batch

    def _add_media(self, batch: dict[str, Any], samples: Sequence[Encoded]) -> None:
        """Each modality's items stacked under its batch key, and the items' annotations, in sample order."""
        for name, spec in self.media.items():
            items = [t for s in samples for t in s.media.get(name, [])]
            if items:
                batch[spec.batch_key] = torch.stack(items)
        meta_keys = sorted({k for s in samples for k in s.meta})
        if meta_keys:
            batch["media_meta"] = {k: [v for s in samples for v in s.meta.get(k, [])] for k in meta_keys}

    def collate_packed(self, samples: Sequence[Encoded], budget: int) -> dict[str, Any]:
        """Samples packed into as few rows of at most ``budget`` tokens as ``pack_rows`` finds: each
        sample's positions restart at 0, its first label is ignored (nothing before it in its own
        sequence predicts it), the padding at a row's end is a sequence of its own, and there is no
        ``attention_mask``: transformers confines attention to each sample from the restarting
        ``position_ids`` (SDPA, eager and flex masks; flash-attention's variable-length path).
        Media and annotations follow the packed order. ``sequence_lengths`` gives each sample's
        length in packed order."""
        rows = pack_rows([len(s.input_ids) for s in samples], budget)
        width = max(sum(len(samples[i].input_ids) for i in row) for row in rows)
        R = len(rows)
        input_ids = torch.full((R, width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((R, width), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros((R, width), dtype=torch.long)
        order: list[int] = []
        for r, row in enumerate(rows):
            at = 0
            for i in row:
                s, n = samples[i], len(samples[i].input_ids)
                input_ids[r, at : at + n] = torch.tensor(s.input_ids, dtype=torch.long)
                labels[r, at + 1 : at + n] = torch.tensor(s.labels[1:], dtype=torch.long)
                position_ids[r, at : at + n] = torch.arange(n)
                at += n
                order.append(i)
            position_ids[r, at:] = torch.arange(width - at)
        packed = [samples[i] for i in order]
        batch: dict[str, Any] = {
            "input_ids": input_ids,
            "labels": labels,
            "position_ids": position_ids,
            "sequence_lengths": torch.tensor([len(s.input_ids) for s in packed]),
        }
        self._add_media(batch, packed)
        return batch

    def __call__(
        self, conversations, media=None, *, add_generation_prompt: bool = True, padding_side: str | None = None
    ):
        """Batch of conversations (or one) -> model inputs. For generation, padding is on the left."""
        if conversations and isinstance(conversations[0], dict):
            conversations, media = [conversations], [media or {}]
        media = media or [{}] * len(conversations)
        enc = [
            self.encode(c, m, add_generation_prompt=add_generation_prompt, index=i)
            for i, (c, m) in enumerate(zip(conversations, media, strict=False))
        ]
        return self.collate(enc, padding_side or ("left" if add_generation_prompt else None))

    def decode(self, ids: Sequence[int]) -> str:
        ids = [i for i in ids if i >= 0]
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def stop_token_ids(self) -> set[int]:
        stops = set()
        if self.tokenizer.eos_token_id is not None:
            stops.add(int(self.tokenizer.eos_token_id))
        end = self.tokenizer.convert_tokens_to_ids(CHAT_MARKERS["end"])
        if not self.use_template and isinstance(end, int) and end != self.tokenizer.unk_token_id:
            stops.add(end)
        return stops


def pack_rows(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """First-fit decreasing: sample indices grouped into rows of at most ``budget`` tokens (a longer
    sample gets a row of its own); the longest samples are placed first, ties in sample order, and
    each row lists its samples in sample order."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda k: (-lengths[k], k)):
        for r, left in enumerate(room):
            if lengths[i] <= left:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(budget - lengths[i])
    return [sorted(row) for row in rows]


def _size(item) -> tuple[int, int]:
    """(width, height) of a media item: a PIL image, or a tensor [C, H, W] taken as it is."""
    if isinstance(item, torch.Tensor):
        return int(item.shape[-1]), int(item.shape[-2])
    return item.size
