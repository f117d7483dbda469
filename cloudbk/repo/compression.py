"""Streaming compression (zstd default, lz4, gzip, none) with a SHA-256 of the uncompressed bytes.

Writers push compressed bytes into any object with ``write`` (an :class:`ObjectWriter`, a file); readers pull
from any readable binary stream. Memory is bounded by the codec window and a chunk, never by the data size:
decompressors are driven through ``read(n)`` so a highly compressible input cannot expand without bound.
"""

from __future__ import annotations

import hashlib
import io
from typing import Any, Protocol

from cloudbk.errors import IntegrityError, UsageError

ALGORITHMS = ("zstd", "lz4", "gzip", "none")
DEFAULT_ALGORITHM = "zstd"
ZSTD_LEVEL = 3  # zstd's own default: the best speed/ratio trade for WAL and data files
READ_CHUNK = 256 * 1024


class Sink(Protocol):
    def write(self, data: bytes | bytearray | memoryview, /) -> int: ...


def check_algorithm(algo: str) -> str:
    if algo not in ALGORITHMS:
        raise UsageError(
            f"unknown compression {algo!r}",
            hint=f"use one of {', '.join(ALGORITHMS)} (--compression / CLOUDBK_COMPRESSION)",
        )
    return algo


class CompressingWriter:
    """``write`` uncompressed bytes; compressed bytes go to ``sink``. ``finish`` ends the stream.

    ``sha256`` and ``size`` describe the uncompressed bytes; ``compressed_size`` what reached the sink.
    The sink is never closed by this object.
    """

    def __init__(self, algo: str, sink: Sink, threads: int = 0) -> None:
        self.algo = check_algorithm(algo)
        self._sink = sink
        self._hash = hashlib.sha256()
        self.size = 0
        self.compressed_size = 0
        self._finished = False
        self._codec: Any
        if algo == "zstd":
            import zstandard

            params = zstandard.ZstdCompressionParameters.from_level(ZSTD_LEVEL, threads=threads, write_checksum=1)
            self._codec = zstandard.ZstdCompressor(compression_params=params).compressobj()
        elif algo == "lz4":
            import lz4.frame

            self._codec = lz4.frame.LZ4FrameCompressor(content_checksum=True)
            self._emit(self._codec.begin())
        elif algo == "gzip":
            import zlib

            self._codec = zlib.compressobj(6, zlib.DEFLATED, 31)
        else:
            self._codec = None

    def _emit(self, data: bytes) -> None:
        if data:
            self._sink.write(data)
            self.compressed_size += len(data)

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if self._finished:
            raise ValueError("write after finish")
        self._hash.update(data)
        self.size += len(data)
        if self._codec is None:
            self._emit(bytes(data))
        else:
            self._emit(self._codec.compress(bytes(data)))
        return len(data)

    def finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        if self.algo == "zstd" or self.algo == "lz4" or self.algo == "gzip":
            self._emit(self._codec.flush())

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()


#: codecs whose frames carry a checksum of their content, which the decompressor verifies at the frame's end
#: (zstd's XXH64 with ``write_checksum``, lz4's content checksum, gzip's CRC-32)
SELF_CHECKING = frozenset({"zstd", "lz4", "gzip"})


class DecompressingReader(io.RawIOBase):
    """Read uncompressed bytes from a compressed ``source`` stream; hashes what it returns (unless ``hashing``
    is False: then ``sha256`` is the empty string)."""

    def __init__(self, algo: str, source: Any, hashing: bool = True) -> None:
        super().__init__()
        self.algo = check_algorithm(algo)
        self._hash = hashlib.sha256() if hashing else None
        self.size = 0
        self._stream: Any
        if algo == "zstd":
            import zstandard

            self._stream = zstandard.ZstdDecompressor().stream_reader(
                source, read_size=READ_CHUNK, read_across_frames=True, closefd=False
            )
        elif algo == "lz4":
            import lz4.frame

            self._stream = lz4.frame.LZ4FrameFile(source, mode="rb")
        elif algo == "gzip":
            import gzip

            self._stream = gzip.GzipFile(fileobj=source, mode="rb")
        else:
            self._stream = source

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        try:
            data = self._stream.read(len(buffer))
        except (OSError, EOFError, ValueError, RuntimeError) as exc:
            # gzip/lz4 raise OSError/EOFError/RuntimeError on broken input; zstandard raises ZstdError
            raise IntegrityError(f"corrupt {self.algo} stream: {exc}") from exc
        except Exception as exc:
            if type(exc).__name__ == "ZstdError":
                raise IntegrityError(f"corrupt zstd stream: {exc}") from exc
            raise
        n = len(data)
        buffer[:n] = data
        if self._hash is not None:
            self._hash.update(data)
        self.size += n
        return n

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest() if self._hash is not None else ""

    def close(self) -> None:
        if not self.closed and self.algo in ("lz4", "gzip"):
            self._stream.close()
        super().close()
