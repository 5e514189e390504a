"""The inference task's flow over a project: images decoded ahead, predicted a batch at a time, written behind.

The device should never wait for the disk or the encoders: a pool of decoder threads reads the next
images while the calling thread predicts, and a pool of writer threads encodes and writes the
previous predictions (OpenCV, Pillow, zlib and numpy release the GIL, so the threads do run beside
the forward).

Items keep their order through every stage, and the outcome is that of a plain loop over them: the
error of the first failing item is the one raised, and only once every item before it is written.
The stages are bounded (decoding two batches ahead, one batch of predictions waiting to be written),
so memory stays that of a few batches whatever the project's size.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from plugin import agent_log
from plugin.format.project import Item
from plugin.inference.items import ReadItem, Unreadable
from plugin.inference.modes import Prediction
from plugin.parallel import available_cores

# Threads per pool. Decoding and encoding an image take a few per cent of its forward on a GPU, so a
# few threads keep up, and more would take cores from the forward's own preprocessing.
MAX_WORKERS = 4
# A batch holds at most this many image pixels (8 images of 2896x2896), decoded images waiting for
# their batch twice as many: a batch's full-size probabilities take 4 bytes per pixel and class, and
# large images must not multiply that by batch_size.
BATCH_PIXELS = 2**26


def run_pipeline(
    items: Sequence[Item],
    read: Callable[[Item], ReadItem | Unreadable],
    predict: Callable[[list[ReadItem]], list[Prediction]],
    write: Callable[[ReadItem, Prediction], int],
    skip: Callable[[Unreadable], None],
    batch_size: int,
    progress: agent_log.Progress,
) -> int:
    """Read, predict and write every item; the number of objects written.

    `read` and `write` run in worker threads, `predict` in the calling thread on `batch_size` items at
    a time (fewer where they would pass BATCH_PIXELS); `skip` is called in item order for each
    unreadable image, and raises to end the run. PROGRESS ticks once per item, when it is written or
    skipped.
    """
    cores = available_cores()
    decoders = ThreadPoolExecutor(min(MAX_WORKERS, cores), thread_name_prefix="infer-read")
    writers = ThreadPoolExecutor(min(MAX_WORKERS, cores), thread_name_prefix="infer-write")
    reads: deque[Future] = deque()
    writes: deque[Future] = deque()
    objects: list[int] = []
    tick_lock = threading.Lock()

    def tick() -> None:
        # Writes end in any order and in any writer thread: PROGRESS reports only the count.
        with tick_lock:
            progress.tick()

    def write_and_tick(read_item: ReadItem, prediction: Prediction) -> int:
        # Ticked before the future completes, so that every tick is logged once the writes are waited for.
        count = write(read_item, prediction)
        tick()
        return count

    def flush(batch: list[ReadItem]) -> None:
        if not batch:
            return
        predictions = predict(batch)
        objects.extend(_results(writes))  # the previous batch, written while this one was predicted
        writes.extend(writers.submit(write_and_tick, *pair) for pair in zip(batch, predictions))

    upcoming = iter(items)

    def read_ahead() -> None:
        while len(reads) < 2 * batch_size and sum(_pixels(f) for f in reads if f.done()) < 2 * BATCH_PIXELS:
            item = next(upcoming, None)
            if item is None:
                return
            reads.append(decoders.submit(read, item))

    try:
        read_ahead()
        batch: list[ReadItem] = []
        failure: Exception | None = None
        while reads:
            future = reads.popleft()
            read_ahead()
            try:
                result = future.result()
                if isinstance(result, Unreadable):
                    skip(result)
                    tick()
                    continue
            except Exception as exc:
                failure = exc  # raised once the items before it are predicted and written, as a loop would
                break
            batch.append(result)
            if len(batch) == batch_size or sum(_pixels(r) for r in batch) >= BATCH_PIXELS:
                flush(batch)
                batch = []
        flush(batch)
        objects.extend(_results(writes))
        if failure is not None:
            raise failure
    except Exception:
        _results(writes)  # the failure of an item written before this one wins
        raise
    finally:
        # Nothing waits for queued work on the way out (an error, Ctrl-C): each thread ends after the
        # item it holds.
        decoders.shutdown(wait=False, cancel_futures=True)
        writers.shutdown(wait=False, cancel_futures=True)
    return sum(objects)


def _results(futures: deque[Future]) -> list:
    """The results of the pending futures, oldest first. The first failure is raised, and the futures
    after it (later items) are cancelled and dropped."""
    done = []
    while futures:
        future = futures.popleft()
        try:
            done.append(future.result())
        except BaseException:
            for later in futures:
                later.cancel()
            futures.clear()
            raise
    return done


def _pixels(read: ReadItem | Unreadable | Future) -> int:
    if isinstance(read, Future):
        read = read.result() if read.exception() is None else None
    return read.size[0] * read.size[1] if isinstance(read, ReadItem) else 0
