"""Error classes: the ground floor of the package (imports nothing of mmlm).

Every error says what is wrong and where: a config key path, a sample index and source, a
checkpoint file.
"""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A pipeline config is wrong; ``path`` is the dotted key path of the offending entry."""

    def __init__(self, message: str, path: str = ""):
        self.path = path
        self.message = message
        # (key path, message) of each problem, when several were found at once (``from_validation``)
        self.problems: list[tuple[str, str]] = [(path, message)]
        super().__init__(f"{path}: {message}" if path else message)

    @classmethod
    def from_validation(cls, err: Any, prefix: str = "", fields: list[str] | None = None) -> ConfigError:
        """One error for every problem pydantic found, each with its full key path; ``fields`` lists
        the valid keys, shown when a key is unknown. A ConfigError raised inside a validator (a part
        that holds another part, as the video encoder holds an image encoder) keeps its own key paths,
        under the validator's."""
        problems: list[tuple[str, str]] = []
        for e in err.errors():
            loc = ".".join(str(p) for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-")))
            path = ".".join(p for p in (prefix, loc) if p)
            inner = (e.get("ctx") or {}).get("error")
            if isinstance(inner, ConfigError):
                problems += [(".".join(p for p in (path, sub) if p), msg) for sub, msg in inner.problems]
                continue
            msg = e["msg"].removeprefix("Value error, ")
            if e["type"] == "extra_forbidden":
                msg = "unknown key" + (f"; valid keys: {', '.join(fields)}" if fields else "")
            elif e["type"] == "literal_error" and "expected" in (e.get("ctx") or {}):
                msg = f"invalid value {e.get('input')!r}; valid choices: {e['ctx']['expected']}"
            elif e["type"] == "missing":
                msg = "required key is missing"
            problems.append((path, msg))
        exc = cls("; ".join(f"{p}: {m}" if p else m for p, m in problems))
        exc.path = problems[0][0] if problems else ""
        exc.problems = problems
        return exc


class UnknownComponentError(KeyError):
    """An exact-name registry lookup failed; the message lists the valid names."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class DataError(ValueError):
    """A data source as a whole cannot be used (a file that is not valid JSON, no usable sample);
    the message names the file or the config key of the source."""


class SampleError(ValueError):
    """A sample cannot be used. ``detail`` is the bare message, ``reason`` a short category for skip
    counts, ``where`` the location (``sample 3``, ``data.json: sample 3 (id x)``)."""

    def __init__(self, detail: str, reason: str, index: int | None = None, where: str | None = None):
        self.reason = reason
        self.index = index
        self.detail = detail
        if where is None:
            where = f"sample {index}" if index is not None else ""
        super().__init__(f"{where}: {detail}" if where else detail)


class SampleTooLong(SampleError):
    def __init__(self, length: int, max_length: int, index: int | None = None):
        self.length = length
        self.max_length = max_length
        super().__init__(
            f"{length} tokens (media tokens included) exceed processor.max_length={max_length}; "
            "the sample is rejected rather than truncated",
            "too long",
            index,
        )


class PlaceholderMismatch(ValueError):
    """The media placeholders of ``input_ids`` and the media features given do not match."""


class CheckpointError(ValueError):
    """A checkpoint directory is not what its config says it is (missing, extra or misshapen tensors)."""


class RunExists(RuntimeError):
    """``--out`` already holds a run and ``--resume`` was not given, another process is training in
    it, or ``--resume`` was given with a config that differs from the run's."""


class TrainingStopped(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped a stage; the message says what was saved and how to continue."""


class TrainingInterrupted(RuntimeError):
    """Raised by ``stop_after`` (tests and tools simulating a kill after a number of steps)."""
