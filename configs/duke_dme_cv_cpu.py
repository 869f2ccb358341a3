"""Duke DME at 64² for the cross-validated SPAD ablation on the CPU.

The recipe of configs/duke_dme_cpu.py (T = 10, KL loss, left-right flips,
own samples over the last 20 % of the steps, the x0_resample sampler at
τ = 2 with the mode for the last 2 jumps, the chain label picked on the
validation patient) at 64² and a budget sized so that the study's 70 runs
fit a working day of this 2-core machine.

  python -m experiments.ablation.main --config=configs/duke_dme_cv_cpu.py \
      --out=docs/study_cv --folds=5 --seeds=0,1 --robustness_seeds=0 \
      --robustness_levels=3,5 --noise_probe_seeds=0
"""

from configs import duke_dme_cpu

EPOCHS = 200


def get_config():
  config = duke_dme_cpu.get_config()
  config.data.image_size = 64
  config.spad.band_width = 2  # 3 px at 128².
  config.train.num_epochs = EPOCHS  # About 9 steps per epoch.
  config.diffusion.own_sample_start_step = int(0.8 * EPOCHS * 9)
  config.train.log_every_steps = 45
  config.train.checkpoint_every_steps = 180
  config.train.checkpoints_to_keep = 1
  config.train.eval_every_epochs = 20
  # The train-split learning curve that shows whether a run converged: the
  # first 32 training B-scans (about 2.5 s per validation).
  config.train.monitor_train_cases = 32
  return config
