"""How every command-line tool reports a failure: one line, `PROG: error: MESSAGE`, exit code 1.

The library raises ValueError (CheckpointError is one) or OSError with a message that names the
problem and the fix; a traceback adds nothing for the user. Any other exception is a bug: it is
reported in one line too, with the hint to rerun under OTSEG_DEBUG=1, which lets every exception
propagate with its traceback. argparse's own usage errors keep argparse's exit code 2.
"""

import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

# The one switch for tracebacks, read only here, at the command-line edge.
DEBUG_VARIABLE = 'OTSEG_DEBUG'


def debug() -> bool:
  return os.environ.get(DEBUG_VARIABLE, '') not in ('', '0')


def error_line(prog: str, e: BaseException) -> str:
  """`PROG: error: ...` for `e`; an unexpected exception type is named as a bug."""
  if isinstance(e, (ValueError, OSError)):
    return f'{prog}: error: {e}'
  return (f'{prog}: error: unexpected {type(e).__name__}: {e} (a bug: rerun with '
          f'{DEBUG_VARIABLE}=1 for the traceback and report it).')


def run(prog: str, main: Callable[[Sequence[str] | None], Any],
        argv: Sequence[str] | None = None) -> int:
  """`main(argv)` as a process exit code: its own (0 when it returns None), or 1 after one error
  line on stderr. Under OTSEG_DEBUG=1 exceptions propagate with their traceback."""
  try:
    code = main(argv)
  except Exception as e:  # pylint: disable=broad-except  # every failure is one line
    if debug():
      raise
    print(error_line(prog, e), file=sys.stderr)
    return 1
  return 0 if code is None else int(code)


def absl_flags_parser(argv: list[str]) -> list[str]:
  """`app.run(main, flags_parser=cli.absl_flags_parser)`: absl's parsing, except that a
  `--config.FIELD=VALUE` naming no field of the config is one line instead of a traceback.

  ml_collections raises AttributeError / KeyError from inside flag parsing for such a field,
  with the field name and its "Did you mean" suggestion as the message.
  """
  from absl import app  # pylint: disable=g-import-not-at-top
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as e:
    if debug():
      raise
    while e.args and isinstance(e.args[0], BaseException):  # AttributeError(KeyError(...))
      e = e.args[0]
    detail = e.args[0] if e.args and isinstance(e.args[0], str) else str(e)
    field, *hints = detail.splitlines() or ['?']
    field = field.strip('\'"')
    overrides = [a.split('=', 1)[0] for a in argv[1:]
                 if a.startswith('--config.') and field in a.split('=', 1)[0].split('.')]
    if not overrides:  # not an override's field: a bug, e.g. in the config file itself
      raise
    sys.exit(f'{os.path.basename(argv[0])}: error: {overrides[0]}: the config has no field '
             f'{field!r}.'
             + ''.join(' ' + h for h in hints)
             + ' The config file lists every field; check the spelling.')
