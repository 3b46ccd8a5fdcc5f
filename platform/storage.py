"""Where a run's state lives: a local folder or object storage, behind one small path type.

`work_dir` may be a local path (relative ones are taken from the current directory), a `file://`
URI, `s3://bucket/prefix` or `gs://bucket/prefix`. Everything a run must find again from another
machine lives there: Ray Train/Tune storage (checkpoints), the resolved config, the MLflow run id,
the status file, sweep state, summaries and plots (docs/architecture.md, "Run layout"). The local
disk holds only caches (`cache_dir`: the generated synthetic set, temp files).

Object storage goes through pyarrow's filesystems, the same ones Ray Train uses for its
`storage_path`, so one set of standard variables configures both: for S3, `AWS_ENDPOINT_URL`
(an S3-compatible server), `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_DEFAULT_REGION`;
for GCS, `GOOGLE_APPLICATION_CREDENTIALS`. Nothing endpoint-specific is ever written in a config.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from maxdeeplab.platform.errors import MaXDeepLabError

REMOTE_SCHEMES = ("s3", "gs")


class StorageError(MaXDeepLabError):
    """Storage that cannot be reached, read or written (the URI and the cause in one line)."""


@dataclass(frozen=True)
class Location:
    """A folder or file on local disk (`uri` is an absolute path) or in a bucket (`s3://b/k`)."""

    uri: str

    @classmethod
    def parse(cls, text: str | Path) -> Location:
        """Normalise a work dir: `~` and relative paths made absolute, `file://` dropped."""
        text = str(text)
        scheme, sep, rest = text.partition("://")
        if sep and scheme in REMOTE_SCHEMES:
            if not rest.split("/", 1)[0]:
                raise StorageError(f"{text}: no bucket named")
            return cls(f"{scheme}://{rest.strip('/')}")
        if sep and scheme == "file":
            text = rest
        elif sep:
            raise StorageError(
                f"{text}: unsupported storage scheme {scheme!r} (use a local path, file://, "
                f"{', '.join(s + '://' for s in REMOTE_SCHEMES)})"
            )
        return cls(str(Path(os.path.expanduser(text)).resolve()))

    @property
    def is_local(self) -> bool:
        return "://" not in self.uri

    @property
    def scheme(self) -> str:
        return self.uri.split("://", 1)[0] if not self.is_local else "file"

    @property
    def name(self) -> str:
        return self.uri.rstrip("/").rsplit("/", 1)[-1]

    @property
    def parent(self) -> Location:
        return Location(self.uri.rstrip("/").rsplit("/", 1)[0])

    def __truediv__(self, name: str) -> Location:
        return Location(f"{self.uri.rstrip('/')}/{name}")

    def __str__(self) -> str:
        return self.uri

    def local_path(self) -> Path:
        """The folder on this machine (only for local storage)."""
        if not self.is_local:
            raise StorageError(f"{self.uri}: not a local path")
        return Path(self.uri)

    # -- file system ----------------------------------------------------------------------------
    def filesystem(self) -> tuple[Any, str]:
        """The pyarrow filesystem and the path inside it (what Ray's storage_filesystem takes)."""
        if self.is_local:
            from pyarrow import fs

            return fs.LocalFileSystem(), self.uri
        return _remote_filesystem(self.scheme), self.uri.split("://", 1)[1]

    def _info(self) -> Any:
        filesystem, path = self.filesystem()
        return self._call(filesystem.get_file_info, path)

    def exists(self) -> bool:
        from pyarrow import fs

        return bool(self._info().type != fs.FileType.NotFound)

    def is_file(self) -> bool:
        from pyarrow import fs

        return bool(self._info().type == fs.FileType.File)

    def read_bytes(self) -> bytes:
        filesystem, path = self.filesystem()
        with self._call(filesystem.open_input_stream, path) as stream:
            return bytes(stream.read())

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def write_bytes(self, data: bytes) -> None:
        """Write a whole file; a reader sees the old content or the new, never a part of it."""
        if self.is_local:
            target = self.local_path()
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, target)
            return
        filesystem, path = self.filesystem()  # an object appears whole when the stream closes
        with self._call(filesystem.open_output_stream, path) as stream:
            stream.write(data)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode())

    def mkdir(self) -> None:
        """Create the folder (a no-op on object storage, where folders are key prefixes)."""
        if self.is_local:
            self.local_path().mkdir(parents=True, exist_ok=True)

    def remove_tree(self) -> None:
        filesystem, path = self.filesystem()
        if self.exists():
            self._call(filesystem.delete_dir, path)

    def list_files(self) -> list[Location]:
        """Every file below this folder, recursively."""
        from pyarrow import fs

        filesystem, path = self.filesystem()
        selector = fs.FileSelector(path, allow_not_found=True, recursive=True)
        prefix = self.uri.split("://", 1)[0] + "://" if not self.is_local else ""
        return [
            Location(prefix + info.path)
            for info in self._call(filesystem.get_file_info, selector)
            if info.type == fs.FileType.File
        ]

    def list_dirs(self) -> list[Location]:
        """The folders directly below this one (none if it does not exist)."""
        from pyarrow import fs

        filesystem, path = self.filesystem()
        selector = fs.FileSelector(path, allow_not_found=True, recursive=False)
        prefix = self.uri.split("://", 1)[0] + "://" if not self.is_local else ""
        return [
            Location(prefix + info.path)
            for info in self._call(filesystem.get_file_info, selector)
            if info.type == fs.FileType.Directory
        ]

    def size(self) -> int:
        """The size of a file in bytes (-1 if it does not exist)."""
        info = self._info()
        return int(info.size) if info.size is not None else -1

    def remove_file(self) -> None:
        """Delete a file (nothing if it does not exist)."""
        filesystem, path = self.filesystem()
        if self.is_file():
            self._call(filesystem.delete_file, path)

    def _call(self, method: Any, *args: Any) -> Any:
        try:
            return method(*args)
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise StorageError(f"{self.uri}: {_first_line(exc)}") from None


@cache
def _remote_filesystem(scheme: str) -> Any:
    """One pyarrow filesystem per scheme and process, configured from the standard variables."""
    from pyarrow import fs

    if scheme == "s3":
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        return fs.S3FileSystem(
            endpoint_override=endpoint or None,
            region=os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or None,
        )
    return fs.GcsFileSystem()


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def check_writable(location: Location) -> None:
    """Pre-flight: the storage answers, the credentials work, the bucket exists, writes succeed.

    Raises:
        StorageError: one line naming the URI and the cause.
    """
    if location.is_local:
        try:
            location.mkdir()
        except OSError as exc:
            raise StorageError(f"{location}: cannot create: {_first_line(exc)}") from None
        if not os.access(location.local_path(), os.W_OK):
            raise StorageError(f"{location}: not writable")
        return
    from pyarrow import fs

    if location.scheme == "s3":
        _check_aws_credentials(location)
    bucket = location.uri.split("://", 1)[1].split("/", 1)[0]
    root = Location(f"{location.scheme}://{bucket}")
    filesystem, path = root.filesystem()
    try:
        info = filesystem.get_file_info(path)
    except OSError as exc:
        raise StorageError(f"{location}: storage unreachable or refused: {_hint(exc)}") from None
    if info.type == fs.FileType.NotFound:
        raise StorageError(f"{location}: bucket {bucket!r} does not exist")
    existed = location.exists()
    probe = location / f".maxdeeplab-write-check-{uuid.uuid4().hex}"
    try:
        probe.write_bytes(b"")
        filesystem.delete_file(probe.filesystem()[1])
        if not existed:  # S3 writes leave "folder" marker objects: leave no trace at all
            filesystem.delete_dir(location.filesystem()[1])
    except (OSError, StorageError) as exc:
        raise StorageError(f"{location}: cannot write: {_hint(exc)}") from None


def _check_aws_credentials(location: Location) -> None:
    """Some credentials exist in the chain boto3 and pyarrow share (variables, profile files,
    web identity, instance metadata). Without any, S3 clients send anonymous requests, which
    some servers accept for reads and a bucket policy may even accept for writes: say so early.
    """
    import boto3

    if boto3.Session().get_credentials() is None:
        raise StorageError(
            f"{location}: no AWS credentials found (set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE with ~/.aws/credentials)"
        )


def _hint(exc: BaseException) -> str:
    """pyarrow's AWS errors are long; keep the part that says what went wrong."""
    text = _first_line(exc)
    for marker in ("Detail:", "error message:"):
        if marker in text:
            text = text.split(marker, 1)[1].strip()
    lowered = text.lower().replace("_", "")
    if any(word in lowered for word in ("credentials", "accessdenied", "invalidaccesskey")):
        return f"{text} (check the credentials: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)"
    if "curl" in text.lower() or "connect" in text.lower():
        endpoint = os.environ.get("AWS_ENDPOINT_URL", "the default endpoint")
        return f"{text} (endpoint {endpoint})"
    return text
