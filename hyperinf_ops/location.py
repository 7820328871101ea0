"""Where hyperinf's files live: a local folder or an S3 prefix (`s3://bucket/prefix`), one abstraction for both.

The Lance tables take `storage_options` (`lance_storage_options`); every other file under the storage root (the
adapter folders, the row whitening, the exports) goes through `Location`, a path-like handle with the few
operations those files need. S3 settings come from the usual environment variables (ENV_OPTIONS), read when a
handle is used, so a process picks up whatever its environment says:

    AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN   credentials (else the default AWS chain)
    AWS_REGION (or AWS_DEFAULT_REGION)                             region
    AWS_ENDPOINT_URL (or AWS_ENDPOINT)                             an S3-compatible server; http:// allows plain HTTP

One file is replaced atomically on both kinds of root (a local rename; one PUT). A folder is published whole
locally (renamed into place) and file by file on S3 with a marker file last, which readers check before use.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

__all__ = ["ENV_OPTIONS", "SCHEMES", "Location", "is_object_store", "lance_storage_options"]

SCHEMES = ("s3",)
# Environment variable(s), first set wins -> Lance storage option. Lance reads most of these itself, but not
# AWS_ALLOW_HTTP from the endpoint's scheme, and explicit options make what a store connects to visible.
ENV_OPTIONS: dict[tuple[str, ...], str] = {
    ("AWS_ACCESS_KEY_ID",): "aws_access_key_id",
    ("AWS_SECRET_ACCESS_KEY",): "aws_secret_access_key",
    ("AWS_SESSION_TOKEN",): "aws_session_token",
    ("AWS_REGION", "AWS_DEFAULT_REGION"): "aws_region",
    ("AWS_ENDPOINT_URL", "AWS_ENDPOINT"): "aws_endpoint",
}
# Downloads of object-store files that must be local to be read (peft adapters, safetensors), by URI and version.
CACHE_DIR = Path(tempfile.gettempdir()) / "hyperinf-cache"


def is_object_store(root: str | os.PathLike[str]) -> bool:
    """Whether `root` is a URI (`scheme://...`) rather than a local path."""
    return "://" in os.fspath(root)


def _env_options() -> dict[str, str]:
    out = {}
    for names, option in ENV_OPTIONS.items():
        value = next((os.environ[n] for n in names if os.environ.get(n)), None)
        if value is not None:
            out[option] = value
    return out


def lance_storage_options(root: str) -> dict[str, str] | None:
    """Lance `storage_options` for tables under `root`: None for a local root, else the set ENV_OPTIONS keys
    (values are strings, as Lance requires) plus `allow_http` for an http:// endpoint."""
    if not is_object_store(root):
        return None
    options = _env_options()
    if options.get("aws_endpoint", "").startswith("http://"):
        options["allow_http"] = "true"  # else Lance refuses the endpoint ("HTTP error: builder error")
    return options


def _s3() -> pafs.S3FileSystem:
    """An S3 filesystem configured like the Lance tables (same environment variables)."""
    return _s3_for(tuple(sorted(_env_options().items())))


@functools.lru_cache(maxsize=4)
def _s3_for(settings: tuple[tuple[str, str], ...]) -> pafs.S3FileSystem:
    """One filesystem (and connection pool) per distinct setting."""
    options = dict(settings)
    return pafs.S3FileSystem(
        access_key=options.get("aws_access_key_id"), secret_key=options.get("aws_secret_access_key"),
        session_token=options.get("aws_session_token"), region=options.get("aws_region", "us-east-1"),
        endpoint_override=options.get("aws_endpoint"))


class Location:
    """A file or folder: a local path or an `s3://bucket/key` URI (trailing slashes dropped)."""

    def __init__(self, where: str | os.PathLike[str] | Location) -> None:
        text = where.uri if isinstance(where, Location) else os.fspath(where)
        self.remote = is_object_store(text)
        if self.remote:
            parsed = urlparse(text)
            if parsed.scheme not in SCHEMES or not parsed.netloc:
                raise ValueError(f"{text!r}: object-store roots must be s3://bucket/prefix")
            self.uri = text.rstrip("/")
            self._key = f"{parsed.netloc}{parsed.path}".rstrip("/")  # pyarrow's bucket/key form
        else:
            self.uri = str(Path(text))
            self._key = self.uri

    def __str__(self) -> str:
        return self.uri

    def __repr__(self) -> str:
        return f"Location({self.uri!r})"

    def __truediv__(self, name: str) -> Location:
        return Location(f"{self.uri}/{name}")

    @property
    def name(self) -> str:
        return self.uri.rsplit("/", 1)[-1]

    @property
    def path(self) -> Path:
        """The local path (local locations only)."""
        if self.remote:
            raise ValueError(f"{self.uri} is not a local path")
        return Path(self.uri)

    def _info(self) -> pafs.FileInfo:
        return _s3().get_file_info(self._key)

    # ------------------------------------------------------------------ reading
    def exists(self) -> bool:
        return self._info().type != pafs.FileType.NotFound if self.remote else self.path.exists()

    def is_file(self) -> bool:
        return self._info().type == pafs.FileType.File if self.remote else self.path.is_file()

    def mtime_ns(self) -> int:
        """When the file was last written (FileNotFoundError when it is not there)."""
        if not self.remote:
            return self.path.stat().st_mtime_ns
        info = self._info()
        if info.type != pafs.FileType.File:
            raise FileNotFoundError(self.uri)
        return info.mtime_ns

    def read_bytes(self) -> bytes:
        if not self.remote:
            return self.path.read_bytes()
        with _s3().open_input_stream(self._key) as stream:
            return stream.read()

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    def folders(self) -> list[Location]:
        """The sub-folders, sorted, without hidden ones (a local folder still being staged is hidden)."""
        if not self.remote:
            found = sorted(p.name for p in self.path.iterdir() if p.is_dir()) if self.path.is_dir() else []
        else:
            infos = _s3().get_file_info(pafs.FileSelector(self._key, allow_not_found=True))
            found = sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)
        return [self / name for name in found if not name.startswith(".")]

    def _files(self) -> list[pafs.FileInfo]:
        """Every file below this (remote) folder."""
        infos = _s3().get_file_info(pafs.FileSelector(self._key, recursive=True, allow_not_found=True))
        return [i for i in infos if i.type == pafs.FileType.File]

    def read_parquet(self, columns: Sequence[str] | None = None) -> pa.Table:
        return pq.read_table(self._key, columns=columns, filesystem=_s3() if self.remote else None)

    def parquet_schema(self) -> pa.Schema:
        return pq.read_schema(self._key, filesystem=_s3() if self.remote else None)

    def local_copy(self) -> Path:
        """A local path holding this file or folder: itself when local; else a download cached under CACHE_DIR,
        keyed by URI and every file's size and write time, so a changed object is fetched again."""
        if not self.remote:
            return self.path
        info = self._info()
        files = [info] if info.type == pafs.FileType.File else self._files()
        if not files:
            raise FileNotFoundError(self.uri)
        stamp = hashlib.sha256(self.uri.encode())
        for f in files:
            stamp.update(f"|{f.path}|{f.size}|{f.mtime_ns}".encode())
        cached = CACHE_DIR / f"{stamp.hexdigest()[:24]}-{self.name}"
        if cached.exists():
            return cached
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        tmp = CACHE_DIR / f".{cached.name}.{uuid.uuid4().hex}"
        try:
            for f in files:
                local = tmp if info.type == pafs.FileType.File else tmp / f.path[len(self._key) + 1:]
                local.parent.mkdir(parents=True, exist_ok=True)
                with _s3().open_input_stream(f.path) as stream:
                    local.write_bytes(stream.read())
            os.replace(tmp, cached)
        except OSError:
            if not cached.exists():  # another process cached the same version first: use theirs
                raise
        finally:
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
        return cached

    # ------------------------------------------------------------------ writing
    def write_bytes(self, data: bytes) -> None:
        """Replace the file atomically: readers see the old bytes or the new ones, never a part."""
        if self.remote:
            with _s3().open_output_stream(self._key) as stream:  # one PUT: the object appears whole
                stream.write(data)
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.name}.tmp-{uuid.uuid4().hex}")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode("utf-8"))

    def remove_tree(self) -> None:
        """Delete this folder and every file below it (nothing to do when it is not there)."""
        if self.remote:
            for info in self._files():
                _s3().delete_file(info.path)
        else:
            shutil.rmtree(self.path, ignore_errors=True)

    @contextmanager
    def staged_folder(self, *, last: str, replace: bool = False) -> Iterator[Path]:
        """Yield a local folder to fill; on a clean exit it becomes this folder, and on an exception nothing does.

        Local: the folder is a hidden sibling renamed into place (an existing folder raises OSError unless
        `replace`, which swaps the old one out). S3: its files are uploaded with `last` (the file readers check)
        uploaded last; an existing `last` raises FileExistsError unless `replace`, which then deletes the old
        files the new folder does not have.
        """
        if self.remote:
            staging = Path(tempfile.mkdtemp(prefix="hyperinf-stage-"))
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            staging = self.path.with_name(f".{self.name}.tmp-{uuid.uuid4().hex}")
            staging.mkdir()
        try:
            yield staging
            if self.remote:
                self._upload(staging, last, replace)
            else:
                self._rename_into_place(staging, replace)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _rename_into_place(self, staging: Path, replace: bool) -> None:
        if not (replace and self.path.exists()):
            os.rename(staging, self.path)
            return
        old = self.path.with_name(f".{self.name}.old-{uuid.uuid4().hex}")
        os.rename(self.path, old)
        os.rename(staging, self.path)
        shutil.rmtree(old)

    def _upload(self, staging: Path, last: str, replace: bool) -> None:
        if not replace and (self / last).is_file():
            raise FileExistsError(f"{self.uri} exists")
        names = sorted(str(p.relative_to(staging)) for p in staging.rglob("*") if p.is_file())
        if last not in names:
            raise FileNotFoundError(f"the staged folder for {self.uri} has no {last}")
        for name in [n for n in names if n != last] + [last]:
            (self / name).write_bytes((staging / name).read_bytes())
        if replace:
            keep = {f"{self._key}/{n}" for n in names}
            for info in self._files():
                if info.path not in keep:
                    _s3().delete_file(info.path)
