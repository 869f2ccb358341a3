"""AMD-SD (Hu et al. 2024): 5 lesion classes, 80/20 patient split, 200 epochs.

Point ``--config.data.root`` at the data set in the folder format of DESIGN §3
(``scripts/convert_to_folder.py`` converts image/mask folders; see
docs/DATA.md). Cases need a ``patient`` so the split never leaks a patient.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.name = 'amdsd'
  config.data.image_size = 256
  config.data.num_classes = 6
  # Label values in this order (names compared ignoring case and '/', '_').
  config.data.class_names = ('background', 'SRF', 'IRF', 'PED', 'SHRM',
                             'IS/OS')
  config.data.val_fraction = 0.0  # The paper's protocol: train/test only.
  config.data.test_fraction = 0.2
  config.train.num_epochs = 200
  config.train.eval_every_epochs = 0  # No val split to validate on.
  return config
