"""The media a pipeline can take: one entry per modality, with its text placeholder, the negative id
that placeholder expands to in ``input_ids``, and the batch key its tensors travel under (the name
transformers uses for that input)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Modality:
    name: str
    placeholder: str  # the marker in message text
    token_id: int  # written into input_ids, never reaches the LLM's embedding table
    batch_key: str  # the model input holding this modality's tensors


IMAGE_PLACEHOLDER = "<image>"
AUDIO_PLACEHOLDER = "<audio>"
VIDEO_PLACEHOLDER = "<video>"

MODALITIES: dict[str, Modality] = {
    "image": Modality("image", IMAGE_PLACEHOLDER, -200, "pixel_values"),  # [B, 3, H, W]
    "audio": Modality("audio", AUDIO_PLACEHOLDER, -300, "input_features"),  # [B, mels, frames]
    "video": Modality("video", VIDEO_PLACEHOLDER, -400, "pixel_values_videos"),  # [B, frames, 3, H, W]
}
