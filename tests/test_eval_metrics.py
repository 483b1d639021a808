"""Evaluation metrics against hand-computed numbers, the reports, and slide inference stitching."""

import json

import numpy as np
import pytest

from otseg_jax import metrics
from otseg_jax import reports

# A 2-image fixture with K = 3 classes, class 2 unseen, 255 ignored.
LABEL_1 = np.array([[0, 0, 1, 255],
                    [1, 2, 2, 2]])
PRED_1 = np.array([[0, 1, 1, 0],
                   [1, 2, 0, 2]])
LABEL_2 = np.array([[1, 1],
                    [2, 255]])
PRED_2 = np.array([[1, 2],
                   [2, 2]])


def test_confusion_matrix_by_hand():
  # Image 1, (gt, pred) pairs of the 7 valid pixels: (0,0) (0,1) (1,1) (1,1) (2,2) (2,0) (2,2).
  np.testing.assert_array_equal(metrics.confusion_matrix(PRED_1, LABEL_1, 3),
                                [[1, 1, 0], [0, 2, 0], [1, 0, 2]])
  # Image 2: (1,1) (1,2) (2,2); the ignored pixel predicted 2 does not count.
  np.testing.assert_array_equal(metrics.confusion_matrix(PRED_2, LABEL_2, 3),
                                [[0, 0, 0], [0, 1, 1], [0, 0, 1]])


def test_metrics_sum_over_the_split_by_hand():
  confusion = (metrics.confusion_matrix(PRED_1, LABEL_1, 3) +
               metrics.confusion_matrix(PRED_2, LABEL_2, 3))
  # Summed: [[1,1,0],[0,3,1],[1,0,3]].
  # IoU0 = 1 / (2 + 2 - 1) = 1/3; IoU1 = 3 / (4 + 4 - 3) = 3/5; IoU2 = 3 / (4 + 4 - 3) = 3/5.
  results = metrics.summarize(confusion, ['a', 'b', 'c'], unseen=[2])
  iou = [row['iou'] for row in results['per_class']]
  np.testing.assert_allclose(iou, [100 / 3, 60, 60])
  seen, unseen = (100 / 3 + 60) / 2, 60.0
  assert results['seen_mIoU'] == pytest.approx(seen)
  assert results['unseen_mIoU'] == pytest.approx(unseen)
  assert results['hIoU'] == pytest.approx(2 * seen * unseen / (seen + unseen))
  assert results['mIoU'] == pytest.approx((100 / 3 + 60 + 60) / 3)
  assert results['aAcc'] == pytest.approx(7 / 10 * 100)  # 7 correct of 10 valid pixels
  assert [row['split'] for row in results['per_class']] == ['seen', 'seen', 'unseen']
  assert [row['pixels'] for row in results['per_class']] == [2, 4, 4]


def test_absent_class_is_left_out_and_no_split_means_no_hiou():
  # Class 2 neither in the labels nor predicted: NaN IoU, not counted in the means.
  confusion = metrics.confusion_matrix(np.array([0, 1, 1]), np.array([0, 1, 0]), 3)
  results = metrics.summarize(confusion, ['a', 'b', 'c'], unseen=[])
  assert results['per_class'][2]['iou'] is None
  assert results['mIoU'] == pytest.approx((50 + 50) / 2)
  assert results['unseen_mIoU'] is None and results['hIoU'] is None
  # A class predicted but absent from the labels has IoU 0 and counts.
  confusion = metrics.confusion_matrix(np.array([2, 1]), np.array([0, 1]), 3)
  results = metrics.summarize(confusion, ['a', 'b', 'c'], unseen=[2])
  assert results['per_class'][2]['iou'] == 0.0
  assert results['unseen_mIoU'] == 0.0 and results['hIoU'] == 0.0


def test_shape_mismatch_is_refused():
  with pytest.raises(ValueError, match='resize the prediction'):
    metrics.confusion_matrix(np.zeros((2, 3)), np.zeros((3, 2)), 3)


def test_reports_are_written(tmp_path):
  confusion = (metrics.confusion_matrix(PRED_1, LABEL_1, 3) +
               metrics.confusion_matrix(PRED_2, LABEL_2, 3))
  results = metrics.summarize(confusion, ['cat', 'dog', 'grass'], unseen=[2])
  reports.write_report(results, tmp_path, title='fixture')
  assert json.loads((tmp_path / 'results.json').read_text())['hIoU'] == pytest.approx(
      results['hIoU'])
  table = (tmp_path / 'per_class.md').read_text()
  assert '| 2 | grass | unseen | 60.00 |' in table and '| hIoU |' in table
  png = (tmp_path / 'per_class_iou.png').read_bytes()
  assert png[:8] == b'\x89PNG\r\n\x1a\n'
  assert not list(tmp_path.glob('.*tmp'))  # atomic writes leave no temporary files


def test_overlay_panel_and_palette():
  image = np.full((4, 6, 3), 100, np.uint8)
  pred = np.zeros((4, 6), np.int64)
  label = np.full((4, 6), 255)
  label[0, 0] = 1
  panel = reports.overlay_panel(image, pred, ['a', 'b'], label)
  # Enlarged x32 (short side at least 128), three panels side by side, a legend below.
  assert panel.shape[1] == 3 * 6 * 32 and panel.shape[0] > 4 * 32 and panel.dtype == np.uint8
  np.testing.assert_array_equal(panel[40, 2 * 192 + 40], image[1, 1])  # ignored label: image
  colours = reports.palette(30)
  assert len({tuple(c) for c in colours[:30]}) == 30  # distinct class colours


def test_slide_evaluator_matches_reference_slide_inference():
  """The batched, fixed-shape window evaluator gives the labels of `inference.predict`."""
  import jax
  import jax.numpy as jnp
  from otseg_jax import inference
  from otseg_jax.models import otseg

  config = otseg.get_config()
  config.image_size = 16
  config.backbone.update(patch_size=8, width=16, layers=1, heads=2, output_dim=16,
                         num_prompt_tokens=1, prompt_depth=0)
  config.head.decoder_layers = 1
  config.ot.max_iterations = 10
  model = otseg.model_from_config(config)
  rng = np.random.default_rng(0)
  text = rng.normal(size=(5, 3, 16)).astype(np.float32)
  text /= np.linalg.norm(text, axis=-1, keepdims=True)
  # jit: eager ott loops take half a minute.
  params = jax.jit(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)), text,
                                      train=False))()['params']
  seen = np.array([True, True, True, False, False])
  probabilities = lambda maps, seen: otseg.eval_probabilities(maps, seen, config)
  evaluator = inference.SlideEvaluator(model, params, text, seen, probabilities=probabilities,
                                       crop_size=16, stride=8, batch_size=4)
  # 3 x 4 overlapping windows, then a single window; 13 windows = 4 model calls of 4.
  images = [rng.normal(size=(32, 40, 3)).astype(np.float32),
            rng.normal(size=(16, 16, 3)).astype(np.float32)]
  out_sizes = [(37, 50), (16, 16)]
  got = dict(evaluator.predict((i, im, size) for i, (im, size) in
                               enumerate(zip(images, out_sizes))))
  assert sorted(got) == [0, 1]

  def encode_fn(x):
    return inference.encode_decode(model, params, x, text, seen, probabilities)

  for i, (image, size) in enumerate(zip(images, out_sizes)):
    predict = jax.jit(lambda x, size=size: inference.predict(encode_fn, x, crop=16, stride=8,
                                                             output_size=size)[0])
    expected = predict(jnp.asarray(image[None]))
    assert got[i].shape == size
    np.testing.assert_array_equal(got[i], np.asarray(expected[0]))


def test_overlay_panels_are_titled_and_legend_names_are_whole(tmp_path):
  image = np.full((4, 6, 3), 100, np.uint8)
  pred = np.zeros((4, 6), np.int64)
  long_name = 'a very long class name, e.g. COCO-Stuff'  # 40 characters
  panel = reports.overlay_panel(image, pred, [long_name, 'b'], np.ones((4, 6), np.int64))
  reports.write_png(tmp_path / 'panel.png', panel)  # to look at
  # A white strip with a dark title over each of the three 192-pixel panels, then the image.
  title_h = next(y for y in range(panel.shape[0]) if (panel[y, :192] == 100).all())
  assert 8 <= title_h <= 24, title_h
  for n in range(3):
    assert (panel[:title_h, n * 192:(n + 1) * 192] < 64).any(), n
  # The legend names the class in full: its text reaches past where 24 characters end.
  strip = reports.legend_strip([0], [long_name], 1, width=600)
  dark = np.nonzero((strip < 64).all(axis=-1).any(axis=0))[0]
  assert dark.max() > 16 + 24 * 6 + 20, dark.max()


def test_per_class_chart_legend_is_off_the_bars():
  results = metrics.summarize(np.diag([10, 20, 30]).astype(np.int64), ['cat', 'dog', 'grass'],
                              unseen=[2])  # every IoU 100: bars reach the top of the axes
  fig = reports.per_class_figure(results, 'fixture')
  fig.canvas.draw()
  ax = fig.axes[0]
  legend = ax.get_legend().get_window_extent()
  axes = ax.get_window_extent()
  assert legend.y0 >= axes.y1 - 1, (legend, axes)
