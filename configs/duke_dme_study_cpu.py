"""Duke DME at the reduced CPU budget of the ablation study (docs/RESULTS.md).

Real OCT (configs/duke_dme.py: 110 B-scans, 10 patients, patient-level split
7 / 1 / 2), shrunk so one run of the five-arm study trains and evaluates in
about 3 minutes on 2 loaded CPU cores: 64² images, a 0.27 M-parameter UNet,
T = 10, 45 epochs of 9 steps (batch 8). This is a *budget* config, far from
the paper's protocol (256², 5.7 M parameters, T = 250, 200 epochs); use
configs/duke_dme.py on a GPU for that.

  python -m experiments.ablation.main --config=configs/duke_dme_study_cpu.py \
      --out=runs/study
"""

from configs import duke_dme


def get_config():
  config = duke_dme.get_config()
  config.data.image_size = 64
  config.data.num_workers = 1

  config.model.base_channels = 16
  config.model.channel_mult = (1, 2, 2)
  config.model.num_res_blocks = 1
  config.model.attention_resolutions = ()
  config.model.norm_groups = 8

  # T = 10: at a few hundred steps short chains learn much faster (demo:
  # T = 250 vs 25; here, fluid Dice on 33 training B-scans after 405 steps
  # was 0.48 with T = 10 and lr 2e-3, vs 0.17 after 450 with T = 25 and 1e-3).
  config.diffusion.num_steps = 10

  config.spad.band_width = 2  # The default 5 px is sized for 256² images.

  config.train.batch_size = 8
  config.train.num_epochs = 45  # 77 training cases: 9 steps/epoch, 405 steps.
  config.train.learning_rate = 2e-3
  config.train.lr_schedule = 'cosine'
  config.train.warmup_steps = 20
  config.train.ema_decay = 0.999
  config.train.log_every_steps = 9
  config.train.checkpoint_every_steps = 81
  config.train.checkpoints_to_keep = 1
  config.train.eval_every_epochs = 9  # Val curve only: 11 B-scans of 1 patient.

  config.eval.num_steps = 10
  config.eval.batch_size = 22
  config.eval.num_grid_cases = 4
  # The final EMA weights for every arm (same budget); best-by-val on one
  # val patient would add a noisy selection step.
  config.eval.checkpoint = 'latest'
  return config
