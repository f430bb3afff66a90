"""Recording files: the one place that writes and reads recorded event streams.

A recording is an Avro object-container file of ``SensorEvent`` records with
the current schema (``schemas/sensor_event.avsc``), so any Avro tool, the
trainer and the job's file mode can read it. Files written with an older or
newer compatible SensorEvent schema are resolved to the current one on read.

Where each event came from in Kafka (topic, partition, offset, record
timestamp) is kept in a sidecar next to it, ``FILE.avro.sources``: an Avro
object-container file of ``RecordedSource`` records
(``schemas/recorded_source.avsc``), the n-th belonging to the n-th event. The
sidecar does not end in ``.avro``, so ``'DIR/*.avro'`` globs match recordings
only, and a recording stays a plain SensorEvent file for every other reader.
"""

from __future__ import annotations

import datetime as dt
import glob
import heapq
import itertools
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple, Sequence, Union

import fastavro
from fastavro.write import Writer

from schemas.serde import EVENT, SCHEMA_DIR, SerdeError, current_schema, read_schema_file

PathLike = Union[str, Path]
SOURCES_SUFFIX = ".sources"
_CODEC = "deflate"
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
_ONE_MS = dt.timedelta(milliseconds=1)


class RecordingError(ValueError):
    """A recording that is missing, unreadable or inconsistent; the message says which."""


class RecordedSource(NamedTuple):
    """Where a recorded event was in Kafka."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int


def sources_path(path: PathLike) -> Path:
    """The sidecar of a recording: ``FILE.avro`` -> ``FILE.avro.sources``."""
    return Path(f"{path}{SOURCES_SUFFIX}")


def _millis(value: Union[int, dt.datetime]) -> int:
    """Epoch millis, exactly: fastavro returns timestamp-millis fields as datetimes."""
    return value if isinstance(value, int) else (value - _EPOCH) // _ONE_MS


def write_events(path: PathLike, events: Iterable[dict], *, sources: Iterable[RecordedSource] | None = None) -> int:
    """Writes SensorEvent dicts (event_time as int millis or datetime) to `path`; returns the count.

    With `sources` (one per event, same order) the sidecar ``path.sources`` is
    written too; without, any old sidecar is removed so it cannot be misread
    as belonging to the new events.
    """
    sidecar = sources_path(path)
    with open(path, "wb") as f:
        writer = Writer(f, fastavro.parse_schema(current_schema(EVENT)), codec=_CODEC)
        if sources is None:
            sidecar.unlink(missing_ok=True)
            count = _write_all(writer, events, path)
        else:
            with open(sidecar, "wb") as g:
                source_writer = Writer(g, fastavro.parse_schema(_source_schema()), codec=_CODEC)
                count = _write_all(writer, events, path, source_writer, sources)
                source_writer.flush()
        writer.flush()
    return count


def _write_all(writer: Writer, events: Iterable[dict], path: PathLike,
               source_writer: Writer | None = None, sources: Iterable[RecordedSource] | None = None) -> int:
    pairs = zip(events, sources, strict=True) if sources is not None else ((e, None) for e in events)
    count = 0
    try:
        for count, (event, source) in enumerate(pairs, start=1):
            writer.write(event)
            if source_writer is not None:
                source_writer.write(source._asdict())
    except ValueError as e:  # fastavro's validation errors, and zip's length mismatch
        raise SerdeError(f"cannot write event {count} to {path}: {e}") from None
    return count


def _source_schema() -> dict:
    return read_schema_file(SCHEMA_DIR / "recorded_source.avsc")


def expand_paths(patterns: Union[PathLike, Sequence[PathLike]]) -> list[Path]:
    """Paths and glob patterns to existing files, each pattern's matches sorted, so runs see one order."""
    if isinstance(patterns, (str, Path)):
        patterns = [patterns]
    paths: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(str(pattern))) if glob.has_magic(str(pattern)) else [str(pattern)]
        if not matches:
            raise RecordingError(f"no file matches {pattern}")
        for match in matches:
            if not Path(match).is_file():
                raise RecordingError(f"file {match} does not exist")
            paths.append(Path(match))
    return paths


def _read_file(path: Path) -> Iterator[dict]:
    reader_schema = current_schema(EVENT)
    with open(path, "rb") as f:
        try:
            for event in fastavro.reader(f, reader_schema=reader_schema):
                event["event_time"] = _millis(event["event_time"])
                yield event
        except (ValueError, EOFError, fastavro.read.SchemaResolutionError) as e:
            raise RecordingError(f"{path} is not a readable SensorEvent recording: {e}") from None


def read_events(paths: Union[PathLike, Sequence[PathLike]]) -> Iterator[dict]:
    """The events of one or more recordings (globs allowed), file after file, in file order.

    Each event is a dict of the current SensorEvent schema with event_time
    as int epoch millis.
    """
    return itertools.chain.from_iterable(_read_file(p) for p in expand_paths(paths))


def merged_events(paths: Union[PathLike, Sequence[PathLike]]) -> Iterator[dict]:
    """The events of several recordings merged by event_time.

    Each file's own order is kept (ties go to the earlier file), so a device's
    events stay in recorded order whichever file they are in.
    """
    return heapq.merge(*(_read_file(p) for p in expand_paths(paths)), key=lambda e: e["event_time"])


def read_sources(path: PathLike) -> Iterator[RecordedSource]:
    """The Kafka positions recorded for the events of `path`, in event order."""
    sidecar = sources_path(path)
    if not sidecar.is_file():
        raise RecordingError(f"{path} has no sidecar {sidecar.name}: it was not written by the record tool")
    with open(sidecar, "rb") as f:
        for record in fastavro.reader(f):
            yield RecordedSource(**record)


def count_events(paths: Union[PathLike, Sequence[PathLike]]) -> int:
    """How many events the recordings hold, from the block headers: no record is decoded."""
    total = 0
    for path in expand_paths(paths):
        with open(path, "rb") as f:
            total += sum(block.num_records for block in fastavro.block_reader(f))
    return total
