"""Duke DME at CPU-test size: 64² images, a 2-level UNet, 3 epochs (27 steps).

The real OCT data of configs/duke_dme.py (read in place from
``../shared/data/duke_dme_fluid``), shrunk so training and evaluation finish
in about a minute on 2 CPU cores.
"""

from configs import duke_dme


def get_config():
  config = duke_dme.get_config()
  config.data.image_size = 64
  config.data.num_workers = 1
  config.model.base_channels = 8
  config.model.channel_mult = (1, 2)
  config.model.num_res_blocks = 1
  config.model.attention_resolutions = ()
  config.diffusion.num_steps = 20
  config.spad.band_width = 2
  config.train.batch_size = 8
  config.train.num_epochs = 3  # 77 training cases: 9 steps per epoch.
  config.train.learning_rate = 3e-3
  config.train.log_every_steps = 3
  config.train.checkpoint_every_steps = 9
  config.train.eval_every_epochs = 0
  config.eval.num_steps = 4
  config.eval.batch_size = 8
  config.eval.num_grid_cases = 2
  return config
