"""Label-value maps: background reduction, COCO-Stuff 182 -> 171 ids, zero-shot visibility.

Each map is a 256-entry lookup table applied as `table[label]` to a uint8 label map, so every
conversion in the package is one indexing operation and can be printed and checked by eye.
Label value 255 means "ignore" everywhere and is never changed.
"""

import numpy as np

from otseg_jax import classes

IGNORE = classes.IGNORE_INDEX

# mmseg's `tools/dataset_converters/coco_stuff164k.py` (`clsID_to_trID`): raw stuffthingmaps id
# (0-181, 91 thing + 91 stuff ids of which 11 thing ids are unused) -> train id (0-170).
# Pairs (raw id, train id); 255 (unlabelled) stays 255. Raw ids 11, 25, 28, 29, 44, 65, 67, 68, 70,
# 82 and 90 are the unused COCO thing ids: they never occur in the released maps. mmseg would leave
# such a value unchanged (its loop only rewrites listed ids); we refuse it (see `coco182_to_171`).
COCO_STUFF_182_TO_171 = (
    (0, 0), (1, 1), (2, 2), (3, 3), (4, 4), (5, 5), (6, 6), (7, 7), (8, 8), (9, 9), (10, 10),
    (12, 11), (13, 12), (14, 13), (15, 14), (16, 15), (17, 16), (18, 17), (19, 18), (20, 19),
    (21, 20), (22, 21), (23, 22), (24, 23), (26, 24), (27, 25), (30, 26), (31, 27), (32, 28),
    (33, 29), (34, 30), (35, 31), (36, 32), (37, 33), (38, 34), (39, 35), (40, 36), (41, 37),
    (42, 38), (43, 39), (45, 40), (46, 41), (47, 42), (48, 43), (49, 44), (50, 45), (51, 46),
    (52, 47), (53, 48), (54, 49), (55, 50), (56, 51), (57, 52), (58, 53), (59, 54), (60, 55),
    (61, 56), (62, 57), (63, 58), (64, 59), (66, 60), (69, 61), (71, 62), (72, 63), (73, 64),
    (74, 65), (75, 66), (76, 67), (77, 68), (78, 69), (79, 70), (80, 71), (81, 72), (83, 73),
    (84, 74), (85, 75), (86, 76), (87, 77), (88, 78), (89, 79), (91, 80), (92, 81), (93, 82),
    (94, 83), (95, 84), (96, 85), (97, 86), (98, 87), (99, 88), (100, 89), (101, 90), (102, 91),
    (103, 92), (104, 93), (105, 94), (106, 95), (107, 96), (108, 97), (109, 98), (110, 99),
    (111, 100), (112, 101), (113, 102), (114, 103), (115, 104), (116, 105), (117, 106),
    (118, 107), (119, 108), (120, 109), (121, 110), (122, 111), (123, 112), (124, 113),
    (125, 114), (126, 115), (127, 116), (128, 117), (129, 118), (130, 119), (131, 120),
    (132, 121), (133, 122), (134, 123), (135, 124), (136, 125), (137, 126), (138, 127),
    (139, 128), (140, 129), (141, 130), (142, 131), (143, 132), (144, 133), (145, 134),
    (146, 135), (147, 136), (148, 137), (149, 138), (150, 139), (151, 140), (152, 141),
    (153, 142), (154, 143), (155, 144), (156, 145), (157, 146), (158, 147), (159, 148),
    (160, 149), (161, 150), (162, 151), (163, 152), (164, 153), (165, 154), (166, 155),
    (167, 156), (168, 157), (169, 158), (170, 159), (171, 160), (172, 161), (173, 162),
    (174, 163), (175, 164), (176, 165), (177, 166), (178, 167), (179, 168), (180, 169),
    (181, 170),
)


def apply(table: np.ndarray, label: np.ndarray) -> np.ndarray:
  """`table[label]` for a uint8 label map; (H, W) -> (H, W) uint8."""
  if label.dtype != np.uint8:
    raise TypeError(f'label maps must be uint8, got {label.dtype}.')
  return table[label]


def reduce_zero_label_table() -> np.ndarray:
  """(256,) uint8: 0 -> 255, i -> i - 1 for 1 <= i <= 254, 255 -> 255.

  mmseg's `reduce_zero_label` (VOC, Pascal-Context, ADE20K): the background / "other" id 0 becomes
  ignore and class i becomes i - 1. This is the ONLY place the package does it; the builders apply
  it once, when a dataset is prepared, so the stored labels are already reduced and every reader
  (training, evaluation, visualisation) sees the same 0..K-1 / 255 values. mmseg maps 255 to 254
  and back to 255 through uint8 wrap-around; here 255 simply stays 255.
  """
  table = np.arange(256, dtype=np.int64) - 1
  table[0] = IGNORE
  table[IGNORE] = IGNORE
  return table.astype(np.uint8)


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
  """Background reduction of a uint8 label map, (H, W) -> (H, W); see `reduce_zero_label_table`."""
  return apply(reduce_zero_label_table(), label)


def coco182_table() -> np.ndarray:
  """(256,) int16: raw COCO-Stuff id -> 171-class train id; 255 -> 255; unused ids -> -1."""
  table = np.full(256, -1, dtype=np.int16)
  for raw, train in COCO_STUFF_182_TO_171:
    table[raw] = train
  table[IGNORE] = IGNORE
  return table


def coco182_to_171(label: np.ndarray) -> np.ndarray:
  """Raw stuffthingmaps label (H, W) uint8, ids 0-181 / 255 -> (H, W) uint8, ids 0-170 / 255.

  Raises ValueError naming the offending ids if the map holds an id that is not one of the 171
  ids in use (an unused thing id or a value above 181): such a map is not a raw COCO-Stuff map.
  """
  if label.dtype != np.uint8:
    raise TypeError(f'label maps must be uint8, got {label.dtype}.')
  out = coco182_table()[label]
  if (out < 0).any():
    bad = sorted(int(v) for v in np.unique(label[out < 0]))
    raise ValueError(f'label ids {bad} are not COCO-Stuff ids in use (0-181 minus the 11 unused '
                     'thing ids, or 255); is this a raw stuffthingmaps PNG?')
  return out.astype(np.uint8)


SETTINGS = ('inductive', 'transductive', 'fully_supervised')


def visibility_table(setting: str, num_classes: int, unseen: tuple[int, ...] | list[int]
                     ) -> np.ndarray:
  """(256,) uint8 map from a stored label (0..K-1, 255) to the label the training loss sees.

  - 'inductive': seen class i -> its index among the seen classes (the model is given only the seen
    text rows, in order); unseen classes and any value >= K -> 255; 255 -> 255.
  - 'transductive': identity on 0..K-1 (unseen pixels keep their global id, so the trainer can
    find exactly those pixels and pseudo-label them); values >= K -> 255.
  - 'fully_supervised': identity on 0..K-1; values >= K -> 255.

  Applied by the training pipeline after augmentation (so RandomCrop's cat_max_ratio counts every
  class, as in mmseg where the zero-shot remap happens inside the head). Evaluation uses stored
  labels unchanged.
  """
  if setting not in SETTINGS:
    raise ValueError(f'Unknown setting {setting!r}; use one of {SETTINGS}.')
  if not 0 < num_classes < IGNORE:
    raise ValueError(f'num_classes {num_classes} must lie in [1, 254]: labels are uint8 with '
                     '255 = ignore.')
  unseen = sorted(set(int(u) for u in unseen))
  if any(u < 0 or u >= num_classes for u in unseen):
    raise ValueError(f'unseen indices {unseen} must lie in [0, {num_classes}).')
  table = np.full(256, IGNORE, dtype=np.uint8)
  if setting == 'inductive':
    seen = [i for i in range(num_classes) if i not in set(unseen)]
    table[seen] = np.arange(len(seen), dtype=np.uint8)
  else:
    table[:num_classes] = np.arange(num_classes, dtype=np.uint8)
  return table
