"""Atomic writes that leave ordinary files: written under a temporary name beside the target, then
renamed into place, so a reader never sees half a file and a crash never leaves one behind.

tempfile.mkstemp / mkdtemp create 0600 / 0700, and the rename keeps that mode, so results would
be private whatever the user's umask says. Here the temporary file or directory is created with
0666 / 0777 and the kernel applies the umask, as for any file a program opens.
"""

import os
import pathlib
import secrets


def temp_path_beside(path: str | os.PathLike) -> pathlib.Path:
  """A fresh hidden name in `path`'s directory (created with O_EXCL / mkdir, so never reused)."""
  path = pathlib.Path(path)
  return path.with_name(f'.{path.name}.tmp-{secrets.token_hex(6)}')


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
  """Writes `data` to `path` atomically, with the mode the umask gives a new file."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = temp_path_beside(path)
  fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    if tmp.exists():
      tmp.unlink()
    raise


def make_temp_dir_beside(path: str | os.PathLike) -> pathlib.Path:
  """A new empty directory to fill and then rename to `path`, with the umask's mode."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = temp_path_beside(path)
  tmp.mkdir(0o777)
  return tmp
