"""Golden cases of mmseg's data pipeline, replayed through `otseg_jax.data.transforms`.

  python -m otseg_jax.parity transforms ../shared/reference/transforms_cases.npz

A case file (format: the `transforms_cases.npz` section of ../shared/reference/README.md) holds
`cases/json`, a list of cases, and their arrays, all images RGB uint8 HWC:
  eval       `<key>/image` -> `<key>/out`: the test Resize at the case's img_scale and min_size.
  train      `<key>/image`, `<key>/label` -> `<key>/out_image`, `<key>/out_label`: Resize(ratio
             0.5-2) -> RandomCrop(cat_max_ratio 0.75) -> RandomFlip(0.5) -> PhotoMetricDistortion
             -> Pad(crop, 0 / 255), before Normalize. `draws` lists mmseg's calls to numpy's
             global RNG, [function, args, result], in order; they are fed to our pipeline in
             place of its generator, which must ask for the same calls in the same order.
  normalize  `normalize/image` -> `normalize/out` (float32).
One line per compared output: max abs difference and share of differing pixels. uint8 outputs must
be identical; Normalize may differ by float32 rounding (one ulp of the reference value).
"""

import argparse
import dataclasses
import json
import pathlib

import numpy as np

from otseg_jax.data import transforms

# numpy legacy RNG function (what mmseg calls) -> the Generator method our pipeline calls.
_GENERATOR_METHOD = {'random_sample': 'random', 'rand': 'random', 'randint': 'integers',
                     'uniform': 'uniform'}


class DrawMismatch(ValueError):
  """Our pipeline asked the RNG for something other than the case's next recorded draw."""


class RecordedDraws:
  """Stands in for np.random.Generator: returns a case's recorded draws, in order.

  Every call must match the next draw's function (legacy name mapped to the Generator method)
  and arguments; otherwise DrawMismatch says which draw and what each side asked for.
  """

  def __init__(self, draws: list):
    self._draws = draws
    self.used = 0

  def _next(self, method: str, args: tuple):
    if self.used >= len(self._draws):
      raise DrawMismatch(f'the pipeline asked for {method}{args} after all {len(self._draws)} '
                         'recorded draws were used.')
    name, recorded_args, result = self._draws[self.used]
    if _GENERATOR_METHOD.get(name) != method or list(recorded_args) != list(args):
      raise DrawMismatch(f'draw {self.used}: the pipeline asked for {method}{tuple(args)}, the '
                         f'case recorded {name}{tuple(recorded_args)}.')
    self.used += 1
    return result

  def random(self) -> float:
    return float(self._next('random', ()))

  def integers(self, *args) -> int:
    return int(self._next('integers', args))

  def uniform(self, *args) -> float:
    return float(self._next('uniform', args))

  def check_all_used(self) -> None:
    if self.used != len(self._draws):
      raise DrawMismatch(f'the pipeline used {self.used} of the {len(self._draws)} recorded '
                         f'draws; the next unused one is {self._draws[self.used]}.')


@dataclasses.dataclass
class Row:
  """One compared output of one case."""
  name: str
  max_abs: float
  share: float  # of differing elements
  ok: bool
  note: str = ''

  def __str__(self) -> str:
    return (f'{self.name:32s} max abs {self.max_abs:10.3g}  differing {100 * self.share:8.4f} %  '
            f'{"ok" if self.ok else "FAIL"}{"  " + self.note if self.note else ""}')


# The arrays `<key>/<name>` each kind of case needs.
_ARRAYS = {'eval': ('image', 'out'), 'train': ('image', 'label', 'out_image', 'out_label'),
           'normalize': ('image', 'out')}


def load_cases(path: str | pathlib.Path) -> tuple[list[dict], dict[str, np.ndarray]]:
  """(cases, arrays) of a case file; one-line errors for a missing file or a foreign format."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f'{path}: no such transforms case file.')
  with np.load(path) as f:
    arrays = {k: f[k] for k in f.files}
  if 'cases/json' not in arrays:
    raise ValueError(f'{path} has no cases/json: not a transforms case file '
                     '(see the transforms_cases.npz section of ../shared/reference/README.md).')
  cases = json.loads(arrays.pop('cases/json').tobytes().decode())
  for case in cases:
    kind, key = case.get('kind'), case.get('key')
    if kind not in _ARRAYS:
      raise ValueError(f'{path}: case {key!r} has kind {kind!r}; known kinds are '
                       f'{", ".join(_ARRAYS)}.')
    missing = [f'{key}/{name}' for name in _ARRAYS[kind] if f'{key}/{name}' not in arrays]
    if missing:
      raise ValueError(f'{path}: {kind} case {key!r} lacks the arrays {", ".join(missing)}.')
  return cases, arrays


def _compare(name: str, ours: np.ndarray, ref: np.ndarray, tol=None) -> Row:
  """Row for ours vs ref. tol: per-element allowed |difference| (None: identical)."""
  if ours.shape != ref.shape or ours.dtype != ref.dtype:
    return Row(name, float('inf'), 1.0, False,
               f'got {ours.dtype} {ours.shape}, reference {ref.dtype} {ref.shape}')
  diff = np.abs(ours.astype(np.float64) - ref.astype(np.float64))
  ok = bool((diff == 0).all()) if tol is None else bool((diff <= tol).all())
  return Row(name, float(diff.max()) if diff.size else 0.0,
             float((diff > 0).mean()) if diff.size else 0.0, ok)


def _eval_rows(case: dict, arrays: dict) -> list[Row]:
  key = case['key']
  image = arrays[f'{key}/image']
  size = transforms.eval_size(image.shape[0], image.shape[1], tuple(case['img_scale']),
                              case.get('min_size'))
  return [_compare(key, transforms.resize_image(image, size), arrays[f'{key}/out'])]


def _train_rows(case: dict, arrays: dict) -> list[Row]:
  key, crop = case['key'], int(case['crop'])
  rng = RecordedDraws(case['draws'])
  try:
    image, label = transforms.augment_record(
        arrays[f'{key}/image'], arrays[f'{key}/label'], rng, crop,
        transforms.TrainAugment(img_scale=tuple(case['img_scale'])))
    rng.check_all_used()
  except DrawMismatch as e:
    return [Row(f'{key} draws', float('inf'), 1.0, False, str(e))]
  # The case stores Pad's output before Normalize: uint8, padded with 0 and 255.
  image, label = transforms.pad_to(image, label, crop)
  return [_compare(f'{key} image', image, arrays[f'{key}/out_image']),
          _compare(f'{key} label', label, arrays[f'{key}/out_label'])]


def _normalize_rows(case: dict, arrays: dict) -> list[Row]:
  key = case['key']
  settings = (tuple(case['mean']), tuple(case['std']), bool(case['to_rgb']))
  if settings != (transforms.MEAN, transforms.STD, True):
    # Our images are RGB throughout, so mmseg's to_rgb=True is the only matching setting.
    return [Row(key, float('inf'), 1.0, False,
                f'case normalises with mean, std, to_rgb = {settings}; otseg_jax with '
                f'{(transforms.MEAN, transforms.STD, True)}')]
  ref = arrays[f'{key}/out']
  # Within float32 rounding: one ulp of the reference value.
  return [_compare(key, transforms.normalize(arrays[f'{key}/image']), ref,
                   tol=np.spacing(np.abs(ref)))]


_ROWS = {'eval': _eval_rows, 'train': _train_rows, 'normalize': _normalize_rows}


def replay(cases: list[dict], arrays: dict[str, np.ndarray]) -> list[Row]:
  """Every case through otseg_jax's transforms; one Row per compared output."""
  rows = []
  for case in cases:
    rows.extend(_ROWS[case['kind']](case, arrays))
  return rows


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m otseg_jax.parity transforms', description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('cases', help='case file (../shared/reference/transforms_cases.npz)')
  args = parser.parse_args(argv)
  try:
    cases, arrays = load_cases(args.cases)
  except (FileNotFoundError, ValueError) as e:
    parser.error(str(e))  # one line and exit status 2, not a traceback
  rows = replay(cases, arrays)
  print(f'{args.cases}: {len(cases)} cases')
  for row in rows:
    print(row)
  failed = [r.name for r in rows if not r.ok]
  print(f'{len(rows) - len(failed)}/{len(rows)} outputs as mmseg\'s'
        + (f'; FAILED: {", ".join(failed)}' if failed else ''))
  return 1 if failed else 0
