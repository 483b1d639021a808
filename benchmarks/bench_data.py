"""Training-pipeline throughput: 512x512 crops per second from a prepared VOC-layout tree.

  python benchmarks/bench_data.py [--images 48] [--batches 12] [--batch_size 8] [--threads 2]
                                  [--workers 0]

Generates `--images` 500x375 JPEGs with 3-6 labelled shapes each in the VOC 2012 layout (in a
temporary folder), prepares them with the real `voc12` builder, then times the real training
loader (mmseg augmentation: rescale, cat_max_ratio crop, flip, photometric distortion, normalise,
pad; inductive label mapping) after one warm-up batch. Prints images/s.
"""

import argparse
import pathlib
import tempfile
import time

import numpy as np
from PIL import Image, ImageDraw


def make_voc_tree(root: pathlib.Path, num_images: int, seed: int = 0) -> None:
  """A VOC2012 tree of 500x375 JPEGs: smooth background plus 3-6 shapes, each its own class."""
  rng = np.random.default_rng(seed)
  voc = root / 'VOCdevkit' / 'VOC2012'
  for sub in ('JPEGImages', 'SegmentationClass', 'SegmentationClassAug',
              'ImageSets/Segmentation'):
    (voc / sub).mkdir(parents=True, exist_ok=True)
  ids = [f'2008_{i:06d}' for i in range(num_images)]
  yy, xx = np.mgrid[0:375, 0:500]
  for name in ids:
    base = rng.uniform(60, 200, 3)
    grad = rng.uniform(-0.2, 0.2, (2, 3))
    pixels = base + yy[..., None] * grad[0] + xx[..., None] * grad[1]
    pixels += rng.normal(0, 12, pixels.shape)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    label = Image.new('L', (500, 375), 0)
    draw_image, draw_label = ImageDraw.Draw(image), ImageDraw.Draw(label)
    for _ in range(rng.integers(3, 7)):
      x0, y0 = rng.integers(0, 400), rng.integers(0, 300)
      box = [int(x0), int(y0), int(x0 + rng.integers(40, 200)), int(y0 + rng.integers(40, 150))]
      colour = tuple(int(c) for c in rng.integers(0, 256, 3))
      draw_image.ellipse(box, fill=colour)
      draw_label.ellipse(box, fill=int(rng.integers(1, 21)))
    image.save(voc / 'JPEGImages' / f'{name}.jpg', quality=90)
    label.save(voc / 'SegmentationClass' / f'{name}.png')
    label.save(voc / 'SegmentationClassAug' / f'{name}.png')
  lists = voc / 'ImageSets' / 'Segmentation'
  (lists / 'train.txt').write_text('\n'.join(ids[: num_images // 2]) + '\n')
  (lists / 'trainaug.txt').write_text('\n'.join(ids) + '\n')
  (lists / 'val.txt').write_text('\n'.join(ids[-2:]) + '\n')


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--images', type=int, default=48)
  parser.add_argument('--batches', type=int, default=12)
  parser.add_argument('--batch_size', type=int, default=8)
  parser.add_argument('--threads', type=int, default=2)
  parser.add_argument('--workers', type=int, default=0)
  args = parser.parse_args()

  from otseg_jax.data import pipeline, prepare  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    make_voc_tree(tmp / 'manual', args.images)
    start = time.perf_counter()
    prepare.prepare('voc12', tmp / 'manual', tmp / 'tfds', num_threads=args.threads)
    prepare_s = time.perf_counter() - start
    split = pipeline.load_split('voc12', 'train', tmp / 'tfds')
    loader = pipeline.make_train_loader(
        split, global_batch_size=args.batch_size, crop_size=512, seed=0, setting='inductive',
        num_threads=args.threads, worker_count=args.workers)
    next(loader)  # warm-up: thread pool, first decodes
    start = time.perf_counter()
    for _ in range(args.batches):
      batch = next(loader)
    elapsed = time.perf_counter() - start
    assert batch['image'].shape == (args.batch_size, 512, 512, 3)
    images = args.batches * args.batch_size
    print(f'prepare: {len(split.source)} train records in {prepare_s:.1f} s')
    print(f'train pipeline: {images / elapsed:.1f} images/s (512x512 crops from 500x375 JPEGs, '
          f'batch {args.batch_size}, {args.threads} threads, {args.workers} workers, '
          f'{images} images in {elapsed:.1f} s)')


if __name__ == '__main__':
  main()
