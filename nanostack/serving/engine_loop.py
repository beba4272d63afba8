"""The bridge between the synchronous engine and the asyncio HTTP server: the engine on a thread of its own.

The engine is single-threaded and blocking (`add_request`, `abort`, `step`), so `EngineLoop` gives it one thread
that steps while there is work and sleeps on a command queue otherwise; nothing else touches the engine. The
event loop puts "add", "abort" and "stop" commands on that queue, and the engine thread hands every RequestOutput
back through `loop.call_soon_threadsafe` to the asyncio.Queue ("sink") of the request it belongs to. If the
thread dies, every request it held or had not yet seen gets None on its sink, so no caller waits forever.

For /metrics it also notes, at the engine's edge, when each request was first scheduled (the start of the first step
that found it running or finished it; a request's finishing output carries that time to `on_output`) and how many
tokens each step computed (`on_step`, called on this thread).
"""
import asyncio
import logging
import queue
import threading
import time

from nanostack.sampling import SamplingParams
from nanostack.serving.engine import Engine, RequestOutput

log = logging.getLogger("nanostack.api")  # the HTTP server's logger: one name for everything serving logs


class EngineLoop:
    """Runs the engine on a thread of its own: commands in through a queue, outputs out to the asyncio loop."""

    def __init__(self, engine: Engine, loop: asyncio.AbstractEventLoop, on_output, on_step):
        """`on_output(sink, output, first_scheduled_time or None)` runs on the event loop, `on_step(num_tokens)` on
        the engine thread."""
        self.engine, self.loop, self.on_output, self.on_step = engine, loop, on_output, on_step
        self.commands: queue.SimpleQueue = queue.SimpleQueue()
        self.sinks: dict[str, asyncio.Queue] = {}  # request id -> its HTTP request's queue (engine thread only)
        self.scheduled_at: dict[str, float] = {}   # request id -> when it was first scheduled (engine thread only)
        self.stats = engine.stats()                 # refreshed after every step, read by /metrics
        self.failure: str | None = None            # why the thread ended; set once, under the lock
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name="engine", daemon=True)

    @property
    def healthy(self) -> bool:
        """The thread runs and has not failed."""
        return self.failure is None and self.thread.is_alive()

    def add(self, request_id: str, prompt: list[int], params: SamplingParams, arrival_time: float, sink) -> None:
        """Queue a request (called on the event loop); if the thread has ended, answer None (failed) at once."""
        with self.lock:  # either the thread sees this command before it ends, or we see its failure
            if self.failure is None:
                self.commands.put(("add", request_id, prompt, params, arrival_time, sink))
                return
        sink.put_nowait(None)

    def abort(self, request_id: str | None = None) -> None:
        """Abort a request (all of them for None); its blocks are freed before the next step."""
        self.commands.put(("abort", request_id))

    def stop(self, timeout: float = 10.0) -> None:
        """End the thread after its current step and wait for it."""
        self.commands.put(("stop",))
        self.thread.join(timeout)

    def _deliver(self, sink: asyncio.Queue, output: RequestOutput | None, scheduled_time: float | None = None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.on_output, sink, output, scheduled_time)
        except RuntimeError:  # the event loop is closed: nobody is waiting any more
            pass

    def _run(self) -> None:
        failure = "the engine was stopped"
        try:
            self._serve()
        except BaseException as error:
            failure = f"{type(error).__name__}: {error}"
            log.exception("the engine thread failed; every request from now on gets an error")
        finally:
            with self.lock:
                self.failure = failure
            # No command can be queued any more: answer every request the engine held or had not seen yet.
            sinks = set(self.sinks.values())
            while not self.commands.empty():
                kind, *args = self.commands.get()
                if kind == "add":
                    sinks.add(args[-1])
            self.sinks.clear()
            for sink in sinks:
                self._deliver(sink, None)

    def _serve(self) -> None:
        engine = self.engine
        while True:
            # Sleep on the queue only when idle; while requests run, take whatever arrived and step on.
            commands = [] if engine.has_unfinished() else [self.commands.get()]
            while not self.commands.empty():
                commands.append(self.commands.get())
            for kind, *args in commands:
                if kind == "stop":
                    return
                if kind == "add":
                    self._add(*args)
                else:
                    for request_id in list(self.sinks) if args[0] is None else args:
                        engine.abort(request_id)
            if engine.has_unfinished():
                self._step()
            self.stats = engine.stats()

    def _step(self) -> None:
        """One engine step; its outputs go to their sinks, its timings to the metrics callbacks."""
        engine, step_start = self.engine, time.monotonic()
        outputs = engine.step()
        if engine.num_step_tokens:
            self.on_step(engine.num_step_tokens)
        for seq in engine.scheduler.running:
            self.scheduled_at.setdefault(seq.request_id, step_start)
        for output in outputs:
            if not output.finished:
                sink, scheduled_time = self.sinks.get(output.request_id), None
            else:  # a finished request no earlier step found running was first scheduled in this one
                sink = self.sinks.pop(output.request_id, None)
                scheduled_time = self.scheduled_at.pop(output.request_id, step_start if output.token_times else None)
            if sink is not None:
                self._deliver(sink, output, scheduled_time)

    def _add(self, request_id, prompt, params, arrival_time, sink) -> None:
        self.sinks[request_id] = sink
        try:
            self.engine.add_request(request_id, prompt, params, arrival_time)
        except ValueError as error:  # the API checked the request already; answer anything it missed
            del self.sinks[request_id]
            self._deliver(sink, RequestOutput(request_id, [], "", True, "error", str(error)))

