"""Whisper's audio encoder (transformers' ``WhisperModel`` encoder) with its feature extractor: a hub
id or local folder (``path``: a Whisper checkpoint, its ``preprocessor_config.json`` read for the
features), or a config built from scratch (``config``: WhisperConfig fields). No torchaudio: the
log-mel features are transformers' ``WhisperFeatureExtractor``.

Items are 1-D float waveforms (numpy arrays or tensors) at the extractor's sampling rate (16 kHz for
Whisper), or ``(waveform, sampling_rate)`` pairs, which are resampled linearly; files are read with
``read_audio`` (soundfile: WAV, FLAC, and MP3 where the installed libsndfile has it). Each item is
padded or cut to the encoder's window (``max_source_positions * 2`` frames of 10 ms: 30 s for
Whisper) and gives ``max_source_positions`` tokens of width ``d_model``; ``select_layers`` indexes
the encoder's hidden states as for images (0: the embeddings, -1: the last block)."""

from __future__ import annotations

import os
import struct
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import Field, model_validator

from mmlm.errors import SampleError
from mmlm.registry import ENCODERS
from mmlm.vision._base import Encoder, EncoderOptions

HOP = 160  # Whisper's hop length in samples (10 ms at 16 kHz)


class WhisperOptions(EncoderOptions):
    path_keys: ClassVar[dict[str, str]] = {"path": "local_or_hub"}
    path: str | None = None  # a Whisper checkpoint: hub id or local folder (its encoder is used)
    config: dict[str, Any] | None = None  # WhisperConfig fields, built from scratch
    sampling_rate: int = Field(16000, gt=0)  # from scratch only; a checkpoint's extractor says its own

    @model_validator(mode="after")
    def _check(self):
        if (self.path is None) == (self.config is None):
            raise ValueError("give exactly one of 'path' (hub id or local folder) or 'config' (WhisperConfig fields)")
        if self.tiling is not None:
            raise ValueError("'tiling' is for image encoders; an audio encoder has no tiles")
        return self


def resample(wave: np.ndarray, sr: int, target: int) -> np.ndarray:
    """Linear resampling (enough for speech-band features; use a proper resampler for music)."""
    if sr == target:
        return wave
    n = int(round(len(wave) * target / sr))
    return np.interp(np.linspace(0, len(wave) - 1, n), np.arange(len(wave)), wave).astype(np.float32)


def read_audio(path, sampling_rate: int = 16000) -> np.ndarray:
    """A sound file as a mono float32 waveform at ``sampling_rate``; failures are SampleErrors: a
    missing file, one that cannot be decoded, a WAV cut short (which libsndfile would read without a
    word, the missing end dropped), and an empty one (0 bytes, or a header and no samples)."""
    try:
        import soundfile
    except ImportError:
        raise SampleError(
            "reading audio files needs soundfile: pip install 'mmlm[audio]'", "missing dependency"
        ) from None
    if not os.path.isfile(path):
        raise SampleError(f"audio not found: {path}", "missing audio")
    if os.path.getsize(path) == 0:
        raise SampleError(f"audio {path} is an empty file (0 bytes)", "empty audio")
    try:
        data, sr = soundfile.read(str(path), dtype="float32", always_2d=True)
        cut = wav_truncation(path)
    except (RuntimeError, OSError, ValueError) as err:  # soundfile's LibsndfileError is a RuntimeError
        raise SampleError(f"audio {path} cannot be decoded: {err}", "corrupt audio") from None
    if cut:
        raise SampleError(f"audio {path} is truncated: {cut}", "corrupt audio")
    if data.shape[0] == 0:
        raise SampleError(f"audio {path} holds no samples (zero length)", "empty audio")
    return resample(data.mean(axis=1), sr, sampling_rate)


def wav_truncation(path) -> str | None:
    """Why a RIFF/WAVE file is cut short (its ``data`` chunk declares more bytes than the file
    holds), or None: for a complete WAV, any other format, and a WAV written as a stream (a data
    size of 0 or 0xFFFFFFFF, to be filled in later)."""
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:] != b"WAVE":
            return None
        size = os.fstat(f.fileno()).st_size
        pos = 12
        while pos + 8 <= size:
            f.seek(pos)
            chunk, n = struct.unpack("<4sI", f.read(8))
            if chunk == b"data":
                have = size - pos - 8
                if n in (0, 0xFFFFFFFF) or n <= have:
                    return None
                return f"its data chunk declares {n} bytes of samples but the file holds {have}"
            pos += 8 + n + (n & 1)  # chunks are padded to an even size
    return None


class AudioTransform:
    """Waveform -> log-mel features ``[mels, frames]`` in the encoder's window."""

    def __init__(self, extractor):
        self.extractor = extractor
        self.sampling_rate = extractor.sampling_rate

    def __call__(self, item) -> torch.Tensor:
        if isinstance(item, tuple) and len(item) == 2:
            wave, sr = item
            wave = resample(np.asarray(wave, dtype=np.float32).reshape(-1), int(sr), self.sampling_rate)
        elif isinstance(item, (np.ndarray, torch.Tensor)):
            wave = np.asarray(item, dtype=np.float32).reshape(-1)
        else:
            raise SampleError(
                f"an audio item is {type(item).__name__}; give a waveform (array) or (waveform, sampling_rate)",
                "unsupported format",
            )
        if wave.size == 0:
            raise SampleError("an audio item is empty (zero length)", "empty audio")
        out = self.extractor(wave, sampling_rate=self.sampling_rate, return_tensors="pt")
        return out.input_features[0]

    def describe(self) -> dict:
        return {"sampling_rate": self.sampling_rate, "mels": self.extractor.feature_size}


EXAMPLE = {
    "config": {
        "d_model": 32,
        "encoder_layers": 2,
        "encoder_attention_heads": 2,
        "encoder_ffn_dim": 64,
        "num_mel_bins": 16,
        "max_source_positions": 25,
    }
}


@ENCODERS.register(
    "whisper",
    options=WhisperOptions,
    summary="Whisper's audio encoder (hub id, local folder or config) with its log-mel features",
    example=EXAMPLE,
)
class WhisperAudioEncoder(Encoder):
    modality = "audio"

    def __init__(self, opts: WhisperOptions, skeleton: bool = False):
        super().__init__(opts.select_layers)
        from transformers import WhisperConfig, WhisperFeatureExtractor
        from transformers.models.whisper.modeling_whisper import WhisperEncoder

        if opts.path is not None:
            conf = WhisperConfig.from_pretrained(opts.path)
            if skeleton:
                self.model = WhisperEncoder(conf)
            else:
                from transformers import WhisperModel

                self.model = WhisperModel.from_pretrained(opts.path, dtype=torch.float32).get_encoder()
            extractor = WhisperFeatureExtractor.from_pretrained(opts.path)
            extractor.n_samples = int(round(extractor.n_samples))  # a fractional chunk_length gives floats
            extractor.nb_max_frames = int(round(extractor.nb_max_frames))
            if extractor.nb_max_frames != conf.max_source_positions * 2:
                raise ValueError(
                    f"model.encoders.audio.path: the feature extractor makes {extractor.nb_max_frames} frames but "
                    f"the encoder takes {conf.max_source_positions * 2}"
                )
        else:
            fields = {"decoder_layers": 1, "decoder_attention_heads": 1, "vocab_size": 8, **opts.config}
            fields.update(pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
            conf = WhisperConfig(**fields)
            self.model = WhisperEncoder(conf)
            seconds = conf.max_source_positions * 2 * HOP / opts.sampling_rate
            extractor = WhisperFeatureExtractor(
                feature_size=conf.num_mel_bins,
                sampling_rate=opts.sampling_rate,
                hop_length=HOP,
                chunk_length=seconds,
                n_fft=400,
            )
            extractor.n_samples = conf.max_source_positions * 2 * HOP
            extractor.nb_max_frames = conf.max_source_positions * 2
        self.pretrained = opts.path is not None
        self.preprocess = AudioTransform(extractor)
        self.num_tokens = conf.max_source_positions
        self.hidden_size = conf.d_model
        self.frames = conf.max_source_positions * 2
        self.layer_shapes = [(self.num_tokens, self.hidden_size)] * len(self.select_layers)

    def forward(self, x: torch.Tensor):
        hidden = self.model(x, output_hidden_states=True).hidden_states
        return self._pick([hidden[self._check_layer(i, len(hidden))] for i in self.select_layers])
