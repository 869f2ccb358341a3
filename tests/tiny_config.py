"""A seconds-sized config for tests: 16² synthetic images, a 2-level UNet."""

from configs import demo


def get_config():
  config = demo.get_config()
  config.data.image_size = 16
  config.data.synthetic.num_train = 32
  config.data.synthetic.num_val = 8
  config.data.synthetic.num_test = 8
  config.data.num_workers = 1
  config.model.base_channels = 8
  config.model.channel_mult = (1, 2)
  config.model.attention_resolutions = (8,)
  config.diffusion.num_steps = 20
  # The paper's KL loss (the demo trains with the hybrid loss); tests of the
  # objective variants set them explicitly.
  config.diffusion.ce_lambda = 0.0
  config.diffusion.ce_weighting = 'constant'
  config.spad.band_width = 1
  config.train.batch_size = 8
  config.train.num_epochs = 3  # 4 steps per epoch.
  config.train.learning_rate = 3e-3
  config.train.lr_schedule = 'constant'
  config.train.warmup_steps = 0
  config.train.log_every_steps = 2
  config.train.checkpoint_every_steps = 4
  config.train.eval_every_epochs = 0  # Tests that validate turn it on.
  config.eval.num_steps = 4
  # The demo picks the chains' label on the validation split; tests keep
  # one fixed label (the pick has its own tests).
  config.eval.chain_label = 'last'
  config.eval.batch_size = 8
  config.eval.num_grid_cases = 2
  return config
