"""One model, one worker thread, a bounded queue: the generation and embedding engine that the
Gradio chat and the OpenAI-compatible API share.

Requests are jobs on one queue (at most ``max_queue`` waiting: ``submit`` raises ``QueueFull``
beyond, which the API answers with 429). The worker takes the oldest job, every queued job of the
same kind, and, for up to ``window_s`` seconds, the jobs of announced requests (``arriving()``:
the server is still reading them), up to ``max_batch``, and runs them as one batch: chat jobs
through ``MultimodalLM.generate`` with per-row options (each row samples from its own seeded
generator, so a request's answer does not depend on the requests decoded beside it, and equals
``mmlm ask``'s for the same input and seed), embedding jobs through one ``MultimodalLM.embed``
call. Jobs that arrive while a batch runs wait for the next one. A chat job's text reaches its
``ChatStream`` as it is generated; a stop string ends the row at the step it appears (the text
before it is the answer); a cancelled stream (the client went away) finishes its row at the next
step, so it no longer costs decoding. The processor encodes each job on its own (or the caller
did, ``encoded=``): a prompt it refuses fails that request only.

The model is touched by the worker thread only (the API encodes a prompt with the processor
before submitting it, to check its length). ``ChatStream`` and ``EmbedJob`` hand results to
the caller's thread (a blocking ``queue.Queue``) or to an asyncio loop (``loop=``), so an HTTP
server waits on them without holding a thread per request.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from mmlm.modalities import IMAGE_PLACEHOLDER


class QueueFull(RuntimeError):
    """The engine's queue holds ``max_queue`` jobs already."""


class EngineClosed(RuntimeError):
    """The engine was closed before the job ran."""


@dataclass(frozen=True)
class Sampling:
    """Per-request decoding options (OpenAI's names)."""

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass
class Finished:
    """How a chat job ended: ``finish_reason`` is ``stop`` (end token or stop string), ``length``
    (``max_tokens``), ``cancelled`` or ``error`` (then ``error`` says why)."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None


class _Channel:
    """Events from the worker to one waiting caller: a thread-safe queue, or an asyncio queue fed
    through ``loop.call_soon_threadsafe``."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None):
        self.loop = loop
        self.sync: queue.Queue = queue.Queue()
        self.aio: asyncio.Queue | None = asyncio.Queue() if loop is not None else None

    def put(self, item) -> None:
        if self.loop is None:
            self.sync.put(item)
        else:
            try:
                self.loop.call_soon_threadsafe(self.aio.put_nowait, item)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                pass

    def get(self, timeout: float | None = None):
        return self.sync.get(timeout=timeout)

    async def aget(self):
        return await self.aio.get()


@dataclass
class ChatJob:
    messages: list[dict]  # mmlm's conversation: role / content, one <image> placeholder per image
    images: list  # PIL images, in placeholder order
    sampling: Sampling
    channel: _Channel
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.monotonic)
    encoded: object = None  # the processor's Encoded sample, when the caller made it already


@dataclass
class EmbedJob:
    items: list  # what MultimodalLM.embed takes: texts, images, {"text", "image"}
    dim: int | None
    side: str
    channel: _Channel
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.monotonic)


class _Arrival:
    """An announced request (``Engine.arriving``); ``done`` once it was queued or given up."""

    done = False


class ChatStream:
    """The text deltas of one chat job, then its ``Finished``. Iterate (``for delta in stream``)
    or ``async for`` (when submitted with a loop); ``finished`` is set once the iteration ends;
    ``result()`` waits for the whole answer; ``cancel()`` frees the job's row at the next step."""

    def __init__(self, job: ChatJob):
        self._job = job
        self.finished: Finished | None = None

    def cancel(self) -> None:
        self._job.cancelled.set()

    def _take(self, item) -> str | None:
        if isinstance(item, Finished):
            self.finished = item
            return None
        return item

    def __iter__(self):
        while self.finished is None:
            delta = self._take(self._job.channel.get())
            if delta:
                yield delta

    async def __aiter__(self):
        while self.finished is None:
            delta = self._take(await self._job.channel.aget())
            if delta:
                yield delta

    def result(self) -> Finished:
        for _ in self:
            pass
        return self.finished

    async def aresult(self) -> Finished:
        async for _ in self:
            pass
        return self.finished


class Engine:
    """``Engine(model)`` starts the worker; ``close()`` stops it (jobs still queued get
    ``EngineClosed``)."""

    def __init__(self, model, max_batch: int = 8, window_s: float = 0.01, max_queue: int = 64):
        if max_batch < 1 or max_queue < 1 or window_s < 0:
            raise ValueError(
                f"need max_batch >= 1, max_queue >= 1, window_s >= 0; got {max_batch}, {max_queue}, {window_s}"
            )
        self.model = model
        self.max_batch, self.window_s, self.max_queue = max_batch, window_s, max_queue
        self._jobs: collections.deque = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._arriving = 0  # requests announced by arriving() and not yet submitted
        self.batches: collections.Counter = collections.Counter()  # batch sizes run, by kind (for tests/benchmarks)
        self.recent: collections.deque = collections.deque(maxlen=256)  # the last chat jobs' Finished, in order
        self._worker = threading.Thread(target=self._run, name="mmlm-engine", daemon=True)
        self._worker.start()

    # ------------------------------------------------------------------ submitting
    def _submit(self, job, arrival: _Arrival | None = None) -> None:
        with self._cond:
            if self._closed:
                raise EngineClosed("the engine is closed")
            if len(self._jobs) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting); try again shortly")
            self._jobs.append(job)
            if arrival is not None and not arrival.done:
                arrival.done = True
                self._arriving -= 1
            self._cond.notify_all()

    def chat(
        self,
        messages: list[dict],
        images: Sequence = (),
        sampling: Sampling | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
        encoded=None,
        arrival: _Arrival | None = None,
    ) -> ChatStream:
        """Queue a conversation (its last turn the user's) for an answer; the stream yields text.
        ``encoded``: ``processor.encode`` of this conversation and images with the generation
        prompt, when the caller has it already (the API checks the prompt's length with it)."""
        n = sum(str(m.get("content", "")).count(IMAGE_PLACEHOLDER) for m in messages)
        if n != len(images):
            raise ValueError(f"the conversation has {n} {IMAGE_PLACEHOLDER} placeholder(s) but {len(images)} image(s)")
        job = ChatJob(list(messages), list(images), sampling or Sampling(), _Channel(loop), encoded=encoded)
        self._submit(job, arrival)
        return ChatStream(job)

    def embed_job(
        self,
        items: Sequence,
        dim: int | None = None,
        side: str = "query",
        loop: asyncio.AbstractEventLoop | None = None,
        arrival: _Arrival | None = None,
    ) -> EmbedJob:
        """Queue items for embedding; ``embed`` waits for the vectors, the API awaits ``job.channel``."""
        job = EmbedJob(list(items), dim, side, _Channel(loop))
        self._submit(job, arrival)
        return job

    def embed(self, items: Sequence, dim: int | None = None, side: str = "query") -> torch.Tensor:
        out = self.embed_job(items, dim, side).channel.get()
        if isinstance(out, BaseException):
            raise out
        return out

    def queued(self) -> int:
        with self._cond:
            return len(self._jobs)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            left = list(self._jobs)
            self._jobs.clear()
            self._cond.notify_all()
        for job in left:
            self._fail(job, EngineClosed("the engine was closed before this request ran"))
        self._worker.join(timeout=30)

    # ------------------------------------------------------------------ the worker
    def _take_batch(self) -> list | None:
        """The oldest job, every queued job of its kind, and those that announced requests submit
        within the window (up to max_batch). With nothing announced the batch starts at once: a
        lone request never waits for company that is not coming."""
        with self._cond:
            while not self._jobs and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            first = self._jobs.popleft()
            batch = [first]
            deadline = time.monotonic() + self.window_s
            while len(batch) < self.max_batch:
                same = [j for j in self._jobs if type(j) is type(first)]
                for j in same[: self.max_batch - len(batch)]:
                    self._jobs.remove(j)
                    batch.append(j)
                left = deadline - time.monotonic()
                if len(batch) >= self.max_batch or left <= 0 or self._arriving <= 0:
                    break
                self._cond.wait(timeout=left)
                if self._closed:
                    break
            return batch

    @contextlib.contextmanager
    def arriving(self):
        """Announce a request that is being read and will be submitted inside this block with
        ``arrival=`` the object it yields (the API wraps parsing and checking a request in it): a
        batch about to start waits up to ``window_s`` for it instead of starting without it. The
        announcement ends when the job is queued (in the same step, so the worker never sees
        neither) or when the block ends without one (a refused request)."""
        arrival = _Arrival()
        with self._cond:
            self._arriving += 1
        try:
            yield arrival
        finally:
            with self._cond:
                if not arrival.done:
                    arrival.done = True
                    self._arriving -= 1
                    self._cond.notify_all()

    def _run(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            live = [j for j in batch if not j.cancelled.is_set()]
            for j in batch:
                if j.cancelled.is_set():
                    self._fail(j, None)
            if not live:
                continue
            self.batches[(type(live[0]).__name__, len(live))] += 1
            try:
                if isinstance(live[0], ChatJob):
                    self._run_chat(live)
                else:
                    self._run_embed(live)
            except Exception as err:  # a batch that fails fails its requests, never the worker
                for j in live:
                    self._fail(j, err)

    def _fail(self, job, err: BaseException | None) -> None:
        if isinstance(job, ChatJob):
            reason = "cancelled" if err is None else "error"
            done = Finished("", reason, 0, 0, None if err is None else _message(err))
            self.recent.append(done)
            job.channel.put(done)
        else:
            job.channel.put(err if err is not None else EngineClosed("cancelled"))

    def _run_embed(self, jobs: list[EmbedJob]) -> None:
        """One embed call per (dim, side) group: the items of every job, split back in order."""
        groups: dict[tuple, list[EmbedJob]] = {}
        for j in jobs:
            groups.setdefault((j.dim, j.side), []).append(j)
        for (dim, side), group in groups.items():
            items = [it for j in group for it in j.items]
            try:
                vecs = self.model.embed(items, dim=dim, side=side, batch_size=max(1, min(len(items), 64)))
            except Exception as err:  # one bad item: run each job alone so the others still get theirs
                if len(group) == 1:
                    raise
                for j in group:
                    try:
                        j.channel.put(self.model.embed(j.items, dim=dim, side=side))
                    except Exception as e:
                        j.channel.put(e)
                del err
                continue
            at = 0
            for j in group:
                j.channel.put(vecs[at : at + len(j.items)])
                at += len(j.items)

    def _run_chat(self, jobs: list[ChatJob]) -> None:
        model = self.model
        proc = model.processor
        encoded, ok = [], []
        for j in jobs:  # each on its own: a prompt the processor refuses fails its request only
            try:
                media = {"image": j.images} if j.images else {}
                enc = j.encoded or proc.encode(j.messages, media, add_generation_prompt=True, index=0)
                encoded.append(enc)
                ok.append(j)
            except Exception as err:
                self._fail(j, err)
        if not ok:
            return
        jobs = ok
        batch = proc.collate(encoded, "left")
        prompt_tokens = batch["attention_mask"].sum(dim=1).tolist()
        rows = [_Row(j, proc) for j in jobs]

        def on_step(step: int, toks: list[int]) -> list[int]:
            finish = []
            for i, (row, t) in enumerate(zip(rows, toks, strict=True)):
                if row.done:
                    continue
                if row.job.cancelled.is_set():
                    row.end("cancelled")
                    finish.append(i)
                elif t < 0:
                    row.end("stop")
                elif row.add(t):  # a stop string appeared
                    finish.append(i)
                elif len(row.ids) >= row.job.sampling.max_tokens:
                    row.end("length")
            return finish

        s = [j.sampling for j in jobs]
        model.generate(
            batch,
            max_new_tokens=[x.max_tokens for x in s],
            temperature=[x.temperature for x in s],
            top_p=[x.top_p for x in s],
            seed=[x.seed for x in s],
            stream=on_step,
        )
        for row, n in zip(rows, prompt_tokens, strict=True):
            if not row.done:  # max_tokens of 0
                row.end("length")
            done = Finished(row.text, row.reason, int(n), len(row.ids))
            self.recent.append(done)
            row.job.channel.put(done)


class _Row:
    """One chat job's tokens and text during decoding: deltas are sent as the decoded text grows
    (a token that completes no character yet sends nothing), held back while the text's end could
    be the start of a stop string, and cut at a stop string."""

    def __init__(self, job: ChatJob, proc):
        self.job, self.proc = job, proc
        self.ids: list[int] = []
        self.text = ""  # decoded so far (up to a stop string)
        self.sent = 0  # characters of text already sent
        self.done = False
        self.reason = ""

    def add(self, token: int) -> bool:
        """Take a token; True when a stop string ended the answer."""
        self.ids.append(token)
        text = self.proc.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for its next token
            return False
        self.text = text
        stops = self.job.sampling.stop
        cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
        if cut >= 0:
            self.text = text[:cut]
            self.end("stop")
            return True
        hold = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self._send(len(text) - hold)
        return False

    def _send(self, upto: int) -> None:
        if upto > self.sent:
            self.job.channel.put(self.text[self.sent : upto])
            self.sent = upto

    def end(self, reason: str) -> None:
        if self.done:
            return
        self.done, self.reason = True, reason
        if reason != "cancelled":
            self._send(len(self.text))


def _message(err: BaseException) -> str:
    text = str(err) or type(err).__name__
    return text if len(text) <= 500 else text[:497] + "..."
