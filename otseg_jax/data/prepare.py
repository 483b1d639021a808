"""Prepare a dataset once: `python -m otseg_jax.data.prepare NAME --manual_dir DIR --data_dir DIR`.

NAME is one of voc12, pascal_context59, coco_stuff164k, ade20k150, or custom/NAME for a folder of
images, PNG label maps and classes.txt (layout: `layouts.CUSTOM_LAYOUT`). The result is a TFDS
dataset in array_record files under DATA_DIR/<builder>/[<config>/]<version>/, written to a
temporary folder and renamed when complete. Flags:
  --skip_bad           leave out records with a corrupt image, a label of the wrong size or bad
                       values, and report how many (default: stop at the first, naming the file)
  --reduce_zero_label  custom datasets only: label 0 is background -> ignore, i -> i - 1
  --overwrite          rebuild a dataset that is already prepared
  --num_threads N      records decoded and checked in parallel (default 4)
"""

import argparse
import dataclasses
import pathlib
import re
import sys

from otseg_jax.data import layouts


@dataclasses.dataclass(frozen=True)
class Prepared:
  """What `prepare` wrote: the dataset folder, records per split, messages of skipped records."""
  path: pathlib.Path
  num_records: dict[str, int]
  skipped: tuple[str, ...]
  reused: bool


def make_builder(name: str, manual_dir: pathlib.Path, data_dir: pathlib.Path, *,
                 skip_bad: bool = False, num_threads: int = 4, reduce_zero_label: bool = False):
  """The TFDS builder for NAME (see module doc), writing array_record files under data_dir."""
  from otseg_jax.data import builders  # pylint: disable=g-import-not-at-top  (imports TFDS)
  common = dict(data_dir=str(data_dir), file_format='array_record', skip_bad=skip_bad,
                num_threads=num_threads)
  if name.startswith('custom/'):
    custom_name = name[len('custom/'):]
    if not re.fullmatch(r'[a-z][a-z0-9_]*', custom_name):
      raise ValueError(f'custom dataset name {custom_name!r}: use lower-case letters, digits and '
                       'underscores, starting with a letter (e.g. custom/my_cells).')
    dataset_classes = layouts.custom_classes(manual_dir, custom_name, reduce_zero_label)
    return builders.CustomSegmentation(classes=dataset_classes, **common)
  if reduce_zero_label:
    raise ValueError('--reduce_zero_label is for custom datasets; the built-in datasets know '
                     'whether they reduce (otseg_jax/classes.json).')
  if name not in builders.BUILDERS:
    raise ValueError(f'Unknown dataset {name!r}; use one of {", ".join(builders.BUILDERS)} or '
                     'custom/NAME.')
  return builders.BUILDERS[name](**common)


def prepare(name: str, manual_dir: str | pathlib.Path, data_dir: str | pathlib.Path, *,
            skip_bad: bool = False, num_threads: int = 4, overwrite: bool = False,
            reduce_zero_label: bool = False) -> Prepared:
  """Checks the layout, then writes the dataset; LayoutError / BadRecordError on bad input."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  manual_dir = pathlib.Path(manual_dir).expanduser().resolve()
  data_dir = pathlib.Path(data_dir).expanduser().resolve()
  builder = make_builder(name, manual_dir, data_dir, skip_bad=skip_bad, num_threads=num_threads,
                         reduce_zero_label=reduce_zero_label)
  # Scan the layout first: a missing folder or list fails here, before TFDS creates anything.
  builder.list_records(manual_dir)
  reused = pathlib.Path(builder.data_dir).joinpath('dataset_info.json').exists() and not overwrite
  mode = (tfds.download.GenerateMode.FORCE_REDOWNLOAD if overwrite
          else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=str(manual_dir), download_mode=mode, try_download_gcs=False,
      compute_stats=tfds.download.ComputeStatsMode.SKIP))
  num_records = {split: info.num_examples for split, info in builder.info.splits.items()}
  skipped = tuple(builder.info.metadata.get('skipped', ())) if reused else tuple(builder.skipped)
  return Prepared(pathlib.Path(builder.data_dir), num_records, skipped, reused)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m otseg_jax.data.prepare', description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('name', help='voc12 | pascal_context59 | coco_stuff164k | ade20k150 | '
                      'custom/NAME')
  parser.add_argument('--manual_dir', required=True, help='the downloaded, mmseg-prepared data')
  parser.add_argument('--data_dir', required=True, help='where the TFDS dataset is written')
  parser.add_argument('--skip_bad', action='store_true')
  parser.add_argument('--reduce_zero_label', action='store_true')
  parser.add_argument('--overwrite', action='store_true')
  parser.add_argument('--num_threads', type=int, default=4)
  args = parser.parse_args(argv)
  from otseg_jax.data import builders  # pylint: disable=g-import-not-at-top
  try:
    result = prepare(args.name, args.manual_dir, args.data_dir, skip_bad=args.skip_bad,
                     num_threads=args.num_threads, overwrite=args.overwrite,
                     reduce_zero_label=args.reduce_zero_label)
  except (layouts.LayoutError, builders.BadRecordError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  if result.reused:
    print(f'{args.name}: already prepared at {result.path} (pass --overwrite to rebuild).')
  else:
    print(f'{args.name}: prepared at {result.path}')
  for split, n in sorted(result.num_records.items()):
    print(f'  {split}: {n} records')
  if result.skipped:
    print(f'  skipped {len(result.skipped)} bad records:')
    for message in result.skipped:
      print(f'    {message}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
