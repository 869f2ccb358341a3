"""CXRS: chest X-rays, 31 structures (+ background), 879/125/250 split, 100 epochs.

Point ``--config.data.root`` at the data set in the folder format of DESIGN §3;
overlapping structures must be flattened to one label map beforehand
(``scripts/convert_to_folder.py --class_dirs`` does it with a stated priority
order; see docs/DATA.md). The data set is in-house: its structure names are
not published, so ``data.class_names`` is left for the user to set.

The fractions below give exactly 879/125/250 of 1,254 cases split by case
(no ``patient`` entries); an explicit ``"split"`` per case in dataset.json
reproduces a given partition instead.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.name = 'cxrs'
  config.data.image_size = 256
  config.data.num_classes = 32
  config.data.val_fraction = 125 / 1254
  config.data.test_fraction = 250 / 1254
  config.train.num_epochs = 100
  # With 32 classes spread over 0..255 adjacent classes differ by 8 grey
  # levels, invisible to Canny(100, 200): detect edges per class instead.
  config.spad.bcd_per_class = True
  return config
