"""AMD-SD (Hu et al. 2024): 5 lesion classes, 80/20 patient split, 200 epochs.

Point ``--config.data.root`` at the data set in the folder format of DESIGN §3.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.name = 'amdsd'
  config.data.image_size = 256
  config.data.num_classes = 6  # background, SRF, IRF, PED, SHRM, IS/OS.
  config.data.val_fraction = 0.0
  config.data.test_fraction = 0.2
  config.train.num_epochs = 200
  return config
