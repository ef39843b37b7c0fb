"""Small shared helpers: image-file discovery, content hashes, atomic writes, torchrun ranks and
the one-line error of every command."""

from __future__ import annotations

import faulthandler
import hashlib
import json
import os
import socket
import sys
import tempfile
import traceback
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist

from .errors import WriterBusyError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif")
DICOM_SUFFIXES = (".dcm", ".dicom")
READABLE_SUFFIXES = IMAGE_SUFFIXES + DICOM_SUFFIXES


def image_files(folder: str | os.PathLike) -> list[Path]:
    """Every image or DICOM file below ``folder`` (recursive, by suffix, case-insensitive), sorted."""
    return sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix.lower() in READABLE_SUFFIXES)


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_json_file(path: str | os.PathLike, what: str, keys: tuple[str, ...], fix: str) -> dict[str, Any]:
    """A JSON object from ``path`` holding ``keys``, or a ValueError that names the file, says
    what is wrong with it and how to fix it (never a raw JSONDecodeError or KeyError)."""
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise ValueError(f"{path}: cannot read the {what} ({error.strerror or error}); {fix}") from None
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: the {what} is damaged (not valid JSON: {error}); {fix}") from None
    missing = [key for key in keys if key not in value] if isinstance(value, dict) else list(keys)
    if missing:
        raise ValueError(f"{path}: the {what} lacks {', '.join(missing)}; {fix}")
    return value


@contextmanager
def atomic_write(target: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path beside ``target``; rename it into place only on success, so a
    killed writer never leaves a partial file."""
    target = Path(target)
    handle, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(handle)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; the result gets the usual permissions
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def writer_lock(path: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold ``path`` as the one writer of ``what`` (an index, an encode output) until the block
    ends. The lock is the kernel's (``flock``), so a killed holder releases it: no stale lock
    outlives its process. The file records the holder (pid, host, command) for the message a
    second writer gets."""
    import fcntl

    path = Path(path)
    while True:
        handle = open(path, "a+", encoding="utf-8")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip()
            handle.close()
            raise WriterBusyError(f"{what} is being written by another process ({_describe_holder(holder)}); "
                                  "wait for it to finish, then run this again") from None
        if path.exists() and os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino:
            break  # not a file a finishing holder has just unlinked
        handle.close()
    handle.truncate(0)
    handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv)[:300]}))
    handle.flush()
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        handle.close()


def lock_for_ranks(stack: ExitStack, path: str | os.PathLike, what: str, rank: int, world: int) -> None:
    """Rank 0 takes :func:`writer_lock` for the job (in ``stack``); every rank raises when it is busy."""
    problem = None
    if rank == 0:
        try:
            stack.enter_context(writer_lock(path, what))
        except WriterBusyError as error:
            problem = str(error)
    problem = from_rank_zero(problem, world)
    if problem is not None:
        raise WriterBusyError(problem)


def _describe_holder(recorded: str) -> str:
    try:
        holder = json.loads(recorded)
        return f"pid {holder['pid']} on {holder['host']}: {holder['command']}"
    except (ValueError, KeyError, TypeError):
        return "it has not said who it is yet"


def join_torchrun(device: str | None = None) -> tuple[int, int, str | None]:
    """(rank, world size, device). Under torchrun with more than one process, join the process
    group: nccl with each rank on its own GPU (unless ``device`` says otherwise), else gloo.
    A single process keeps ``device`` as given."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or "RANK" not in os.environ:
        return 0, 1, device
    faulthandler.enable(all_threads=True)  # a rank killed by a signal prints where each of its threads was
    if torch.cuda.is_available():
        local = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(local)
        dist.init_process_group("nccl")
        return dist.get_rank(), dist.get_world_size(), device or local
    dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), device


def leave_torchrun(succeeded: bool = True) -> None:
    """Leave the process group :func:`join_torchrun` joined (nothing to leave in a single process).
    After a run that succeeded every rank first meets at a barrier, so that none shuts its
    connections down while a peer is still in a collective (seen once in CI: a rank aborting at
    exit after an FSDP run). After a failure the rank leaves at once: a barrier would wait for
    peers that may never come."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if succeeded:
        dist.barrier()
    dist.destroy_process_group()


def from_rank_zero(value: Any, world: int) -> Any:
    """Rank 0's ``value`` on every rank (``world`` > 1: a broadcast, so call it on all ranks);
    for a decision only rank 0 may take, before any rank acts on the files it is about."""
    if world <= 1:
        return value
    shared = [value]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]


def barrier(world: int) -> None:
    """Wait for every torchrun rank (nothing to wait for in a single process)."""
    if world > 1:
        dist.barrier()


def run_command(prog: str, command: Callable[[], object], expected: tuple[type[BaseException], ...],
                debug: bool = False) -> int:
    """Run a command's body: the ``expected`` errors become one line ``PROG: error: ...`` and exit 1
    (with the traceback first when ``debug``); Ctrl-C exits 130."""
    try:
        command()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except expected as error:
        if debug:
            traceback.print_exc()
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 1
    return 0


def content_sha256(item: object) -> str:
    """sha256 of a file's bytes (a path) or of an array's values with its shape and dtype."""
    if isinstance(item, (str, os.PathLike)):
        return file_sha256(item)
    array = item.numpy() if isinstance(item, torch.Tensor) else np.asarray(item)
    digest = hashlib.sha256(f"{array.shape}{array.dtype}".encode())
    digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def state_sha256(state: dict[str, torch.Tensor]) -> str:
    """sha256 of a state dict's names and exact tensor bytes (dtype included)."""
    digest = hashlib.sha256()
    for name, tensor in state.items():
        digest.update(f"{name}:{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())  # 0-d too (BN counters)
    return digest.hexdigest()
