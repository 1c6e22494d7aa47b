"""Files on disk, read with errors a user can act on and written so nothing half-done remains.

Every command reads JSON and JSONL through `read_json` / `read_jsonl` (a bad line is reported
as `file:line`), and writes through `write_json`, `staged_file` or `staged_dir`: the output is
built beside its destination and renamed into place when complete, so an interrupted run never
leaves something that looks finished (DESIGN §2, "errors are for people"); `staged_path` for
writers that want a name. Whether an output may be replaced is `check_replaceable`. A damaged
checkpoint read back is one line too (`damaged_is_one_line`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from limajax.errors import UserError


def read_json(path: str | Path) -> dict:
    """A JSON object from a file; missing, malformed or not an object is the user's to fix."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: expected a JSON object")
    return obj


def read_jsonl(path: str | Path, data: bytes | None = None) -> Iterator[tuple[str, int, Any]]:
    """(where, line number, value) for each non-blank line; `where` is "file:line" for the
    caller's own checks. Invalid UTF-8 or JSON is a UserError naming the line. `data`: the
    file's bytes if the caller already read them (e.g. to checksum them).

    The one JSONL rule: lines end at "\n" only, never where str.splitlines would also cut
    ("\r", U+2028, U+2029, U+0085, \x1c-\x1e): json_line writes those unescaped inside strings
    (ensure_ascii=False), and a user's file may hold them."""
    path = Path(path)
    if data is None:
        if not path.is_file():
            raise UserError(f"{path}: no such file")
        data = path.read_bytes()
    for lineno, raw in enumerate(data.split(b"\n"), 1):
        where = f"{path}:{lineno}"
        try:
            line = raw.decode("utf-8")
            if not line.strip():
                continue
            yield where, lineno, json.loads(line)
        except UnicodeDecodeError:
            raise UserError(f"{where}: not UTF-8 text") from None
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None


def write_json(path: str | Path, obj) -> None:
    """Write `obj` as indented JSON, atomically (a reader sees the old file or the new one)."""
    with staged_file(path) as f:
        f.write(json.dumps(obj, indent=2) + "\n")


def json_line(obj) -> str:
    """One line of strict JSON (RFC 8259): a NaN or infinite float becomes null, which jq and
    JavaScript read, where Python's default writes a bare NaN they reject (review R4)."""
    def strict(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: strict(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [strict(v) for v in x]
        return x

    return json.dumps(strict(obj), ensure_ascii=False, allow_nan=False) + "\n"


def write_jsonl(path: str | Path, rows) -> None:
    """Write `rows` as a whole JSONL file, atomically (staged_file): the rewrite of a file
    read with read_jsonl (reordered, filtered), one json_line per row."""
    with staged_file(path) as f:
        f.writelines(json_line(row) for row in rows)


def append_jsonl(path: str | Path, row: dict) -> None:
    """Append one row to a JSONL file (a crash loses at most the row being written)."""
    with Path(path).open("a", encoding="utf-8") as f:
        f.write(json_line(row))


def drop_torn_last_line(path: str | Path) -> bool:
    """A process killed while appending can leave a last line without its newline: cut it off
    (it was never a finished row). True if something was cut."""
    p = Path(path)
    if not p.is_file() or p.stat().st_size == 0:
        return False
    with p.open("rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return False
        data = p.read_bytes()
        f.truncate(data.rfind(b"\n") + 1)
    return True


@contextlib.contextmanager
def staged_path(path: str | Path) -> Iterator[Path]:
    """A path beside `path` to write to (by name, e.g. matplotlib's savefig, which then needs
    its format: the name ends in .tmp), renamed onto `path` on success, removed on failure."""
    path = Path(path)
    remove_stale(path)
    tmp = path.with_name(f".{path.name}.{_OWNER}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def staged_file(path: str | Path) -> Iterator[IO[str]]:
    """A text file opened beside `path` (staged_path), closed before it is renamed onto it."""
    with staged_path(path) as tmp, tmp.open("w", encoding="utf-8") as f:
        yield f


OUTPUT_MARKER = ".limajax-output.json"  # {"command": ...}: which command made a directory


# Temporary outputs are named .NAME.HOST~PID.…: a later run on the same host removes those whose
# process is gone (killed, or a Ctrl-C during the cleanup), which are hidden and can be the size
# of a model (newcomer F6). Another host's are left alone: its process may be alive.
_OWNER = f"{socket.gethostname().replace('.', '_')}~{os.getpid()}"


def remove_stale(final: Path) -> None:
    """Remove the temporary siblings of `final` left by dead processes of this host."""
    pattern = re.compile(rf"\.{re.escape(final.name)}\.(.+)~(\d+)\..*(partial|old|tmp)$")
    host = _OWNER.split("~")[0]
    if not final.parent.is_dir():
        return
    for sibling in final.parent.iterdir():
        m = pattern.fullmatch(sibling.name)
        if not m or m.group(1) != host or _alive(int(m.group(2))):
            continue
        if sibling.is_dir() and not sibling.is_symlink():
            shutil.rmtree(sibling, ignore_errors=True)
        else:
            sibling.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_replaceable(final: str | Path, *, overwrite: bool | None, command: str | None = None
                      ) -> None:
    """May a command write its output at `final`? Nothing there, or an empty directory, is
    free. Anything else needs `overwrite` (None: the command has no --overwrite), and then a
    file output (`command` None) replaces only a file, a directory output only what an earlier
    run of the same `command` made (its OUTPUT_MARKER says so), so a mistyped --output or
    --workdir never deletes someone's files (newcomer F1)."""
    final = Path(final)
    is_dir = final.is_dir() and not final.is_symlink()
    if command is None and final.is_dir():
        raise UserError(f"{final}: is a directory (--output)")
    if not (final.exists() or final.is_symlink()) or (is_dir and not any(final.iterdir())):
        return
    if not overwrite:
        raise UserError(f"{final}: already exists " + (
            "and is not empty; choose a new --output" if overwrite is None else
            "(pass --overwrite to replace it)"))
    if command is not None and (not is_dir or made_by(final) != command):
        raise UserError(f"{final}: refusing to replace it: it is not an earlier output of "
                        f"`limajax {command}` (delete it yourself if you mean to)")


def made_by(directory: Path) -> str | None:
    """The command recorded in a directory's OUTPUT_MARKER, or None."""
    try:
        return json.loads((directory / OUTPUT_MARKER).read_text()).get("command")
    except (OSError, ValueError, AttributeError):
        return None


def mark_output(directory: str | Path, command: str) -> None:
    (Path(directory) / OUTPUT_MARKER).write_text(json.dumps({"command": command}) + "\n")


def share_like_umask(root: Path) -> None:
    """Give a finished output the permissions the user's umask gives new files: mkdtemp and
    some writers (safetensors) create owner-only ones, which others on a cluster cannot read."""
    umask = os.umask(0)
    os.umask(umask)
    root.chmod(0o777 & ~umask)
    for parent, dirs, files in os.walk(root):
        for name in dirs:
            (Path(parent) / name).chmod(0o777 & ~umask)
        for name in files:
            (Path(parent) / name).chmod(0o666 & ~umask)


@contextlib.contextmanager
def staged_dir(final: str | Path, *, command: str, overwrite: bool | None = False
               ) -> Iterator[Path]:
    """Yield an empty temporary directory beside `final`; rename it to `final` on success.

    On any error the temporary directory is removed and `final` is untouched. An existing
    `final` is replaced only as `check_replaceable` allows; the new directory records
    `command`, so a later --overwrite of the same command may replace it.
    """
    final = Path(final)
    check_replaceable(final, overwrite=overwrite, command=command)
    # Parents made here go again if the output fails (a convert refused for its inputs left an
    # empty models/ behind): innermost first.
    made = [d for d in final.absolute().parents if not d.exists()]
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.{_OWNER}.", suffix=".partial",
                                dir=final.parent))
    try:
        yield tmp
        mark_output(tmp, command)
        share_like_umask(tmp)
        if final.exists():
            # Move the old output aside first: at every instant one complete directory exists.
            old = tmp.with_suffix(".old")
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old)
        else:
            tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for directory in made:
            with contextlib.suppress(OSError):  # not empty: something else is in it now
                directory.rmdir()
        raise


# --- damaged checkpoints ---------------------------------------------------------------------
# One rule for every Orbax restore, a model directory's parameters or a workdir's TrainState.


@contextlib.contextmanager
def damaged_is_one_line(what: str):
    """Any failure of the Orbax restore inside becomes `UserError("what (first line of the
    reason)")`: Orbax and TensorStore raise many types for a missing or truncated file."""
    quiet_orbax()
    try:
        yield
    except Exception as e:
        raise UserError(f"{what} ({error_reason(e)})") from None


def error_reason(error: BaseException) -> str:
    """The part of an Orbax / TensorStore error a person can read: its first line without
    TensorStore's `[tensorstore_spec=...]` annotations and without Python reprs (`<bound method
    ...>`, `<... at 0x...>`), and of its chain of "context: cause" clauses the last two (the
    file and what is wrong with it)."""
    text = str(error).strip()
    if not text:
        return type(error).__name__
    text = text.splitlines()[0]
    text = re.sub(r"\s*\[\w[\w ]*(\[\d+\])?=.*$", "", text)  # annotations run to the end
    text = re.sub(r"<[^<>]* at 0x[0-9a-f]+>", "", text)  # innermost reprs first
    text = re.sub(r"<bound method[^>]*>?", "", text).strip().rstrip(":").strip()
    clauses = text.split(": ")
    return ": ".join(clauses[-2:])[:300] or type(error).__name__


def quiet_orbax() -> None:
    """After a failed restore or save, limajax says what happened in one line; Orbax's own
    aftermath is dropped (installed once, for the process):

    - TensorStore reads and writes still in flight complete on Orbax's closed asyncio loop and
      each prints `RuntimeError: Event loop is closed` (hundreds of tracebacks for one damaged
      file or one full disk), through sys.unraisablehook or, from TensorStore's callbacks,
      through sys.excepthook; at interpreter exit the same threads print `ImportError:
      sys.meta_path is None`;
    - Orbax logs every failed array as an ERROR with its traceback (absl's logger).

    Any other exception goes to the hook that was there before, and Orbax's other records to
    the logger."""
    global _quiet
    if _quiet:
        return
    _quiet = True
    previous_unraisable, previous_except = sys.unraisablehook, sys.excepthook

    def unraisable(u):
        if not _aftermath(u.exc_value):
            previous_unraisable(u)

    def excepthook(kind, value, traceback):
        if not _aftermath(value):
            previous_except(kind, value, traceback)

    sys.unraisablehook, sys.excepthook = unraisable, excepthook
    logging.getLogger("absl").addFilter(_OrbaxErrors())
    logging.getLogger("asyncio").addFilter(_OrbaxFutures())


def _aftermath(error: BaseException | None) -> bool:
    return (isinstance(error, RuntimeError) and str(error) == "Event loop is closed") or (
        isinstance(error, ImportError) and str(error).startswith("sys.meta_path is None"))


class _OrbaxErrors(logging.Filter):
    """Drops Orbax's ERROR records: each failure they log reaches limajax as an exception,
    which it reports in one line (damaged_is_one_line, save_failure_is_one_line)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and f"{os.sep}orbax{os.sep}" in
                    record.pathname)


class _OrbaxFutures(logging.Filter):
    """Drops asyncio's "exception was never retrieved" records of Orbax's own futures (a failed
    background save's writes, reported at exit): limajax has already said it in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        tb = getattr(error, "__traceback__", None)
        while tb is not None:
            if f"{os.sep}orbax{os.sep}" in tb.tb_frame.f_code.co_filename:
                return False
            tb = tb.tb_next
        return True


_quiet = False
