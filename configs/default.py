"""Default hyper-parameters: every number of DESIGN.md §1–2 lives here.

Other configs start from ``get_config()`` and change what differs. Override
any key on the command line, e.g. ``--config.train.batch_size=16``.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0

  # Data (DESIGN §3). `name` picks the loader: synthetic | folder | amdsd |
  # cxrs | duke_dme (the last three read the folder format under `root`).
  config.data = ml_collections.ConfigDict()
  config.data.name = 'synthetic'
  config.data.root = ''
  config.data.image_size = 256
  config.data.num_classes = 4  # Background included.
  config.data.channels = 1
  config.data.split_seed = 0  # Patient-level split of folder data sets.
  config.data.val_fraction = 0.1
  config.data.test_fraction = 0.2
  # k-fold cross-validation over patients: with num_folds >= 2, fold `fold`
  # is the test set (test_fraction is then unused). 0: a single split.
  config.data.num_folds = 0
  config.data.fold = 0
  # Expected class names in label order (checked against dataset.json);
  # () accepts whatever dataset.json declares (its count must still match).
  config.data.class_names = ()
  # How folder data sets are read: 'numpy' (OpenCV, TensorFlow-free) or
  # 'tfds' (a TFDS builder prepared once under `tfds_dir`; same arrays).
  config.data.reader = 'numpy'
  config.data.tfds_dir = ''  # '' = TFDS's default (~/tensorflow_datasets).
  # Training augmentations, applied to image and label before the SPAD masks
  # are built (spad_jax/data/augment.py). All off by default.
  config.data.augment = ml_collections.ConfigDict()
  config.data.augment.flip = False  # Left-right, probability 1/2.
  config.data.augment.rotate_deg = 0.0  # Max |angle| in degrees.
  config.data.augment.scale = 0.0  # Zoom in [1 - scale, 1 + scale].
  config.data.augment.translate = 0.0  # Max shift, fraction of the size.
  config.data.augment.gain = 0.0  # Intensity gain in [1 - gain, 1 + gain].
  config.data.augment.bias = 0.0  # Offset in [-bias, bias] (on [0, 1]).
  config.data.augment.gamma = 0.0  # Gamma in [1 - gamma, 1 + gamma].
  # Synthetic OCT-like generator (spad_jax/data/synthetic.py).
  config.data.synthetic = ml_collections.ConfigDict()
  config.data.synthetic.seed = 1234
  config.data.synthetic.num_train = 512
  config.data.synthetic.num_val = 32
  config.data.synthetic.num_test = 64
  config.data.num_workers = 2  # Parallel calls building examples and masks.
  config.data.prefetch = 2  # Batches prefetched to the devices.
  # 'tf' (tf.data) or 'numpy' (TensorFlow-free, same examples and masks).
  config.data.loader = 'tf'

  # Denoiser (DESIGN §1: CCDM's UNet, ≈5.7 M parameters at 128²).
  config.model = ml_collections.ConfigDict()
  # 'diffusion' (CCDM) or 'deterministic': the same UNet with x_t and t
  # fixed, trained with CE + soft Dice, one forward pass at test time.
  config.model.kind = 'diffusion'
  config.model.base_channels = 32
  config.model.channel_mult = (1, 1, 2, 3, 4)
  config.model.num_res_blocks = 2
  config.model.attention_resolutions = (16, 8)
  config.model.num_heads = 1
  config.model.norm_groups = 32
  config.model.dropout = 0.0
  config.model.dtype = 'float32'  # or 'bfloat16'; loss maths stay float32.
  # Self-conditioning (Chen et al. 2022, Analog Bits): the previous step's p̂
  # is an extra input (zeros: none); trained with it on half the examples,
  # estimated by a first, gradient-free pass of the same model.
  config.model.self_condition = False

  # Categorical diffusion.
  config.diffusion = ml_collections.ConfigDict()
  config.diffusion.num_steps = 250  # T.
  config.diffusion.cosine_s = 0.008
  # Hybrid loss L_t + ce_lambda·w(t)·CE(x0, p̂) (D3PM); 0 = the paper's KL.
  config.diffusion.ce_lambda = 0.0
  # w(t): 'constant' (1) or 'stage' ((1 - ᾱ_t), normalised to mean 1 over t:
  # the CE weight grows where ᾱ_t is small, UniSegDiff's staged targets).
  config.diffusion.ce_weighting = 'constant'
  # + dice_lambda·H·W·soft Dice(x0, p̂) over the foreground classes: a term
  # that does not fade with a rare class (docs/CONVERGENCE.md); 0 = off.
  config.diffusion.dice_lambda = 0.0
  # Its weight over t, as ce_weighting: 'constant' or 'stage' ((1 - ᾱ_t),
  # mean 1: the Dice asks for the label where x_t tells little of it).
  config.diffusion.dice_weighting = 'constant'
  # Training times: 'uniform' (the paper's), 'stratified' over the global
  # batch, or 'importance' (π(t) ∝ sqrt(E[L_t²]), loss weighted 1/(T·π(t));
  # uniform until every t has `importance_history` recorded losses).
  config.diffusion.t_sampling = 'uniform'
  config.diffusion.importance_history = 10
  config.diffusion.importance_uniform = 0.001  # Uniform mass mixed into π.
  # Training on the model's own x_t (against exposure bias, docs/SAMPLING.md):
  # this fraction of the examples draws x_t by one sampler jump of the
  # current model (no gradient) from t' = min(t + own_sample_stride, T),
  # x_t' ~ q(x_t'|x0), instead of x_t ~ q(x_t|x0). 0: the paper's training.
  # The jump is own_sample_sampler's (an eval.sampler name): set it to the
  # sampler the model will run, so training sees the inputs it will get.
  config.diffusion.own_sample_fraction = 0.0
  config.diffusion.own_sample_stride = 25
  config.diffusion.own_sample_sampler = 'ancestral'
  # The jump draws from p̂^(1/τ) renormalised, as eval.temperature does in
  # the chain: set it to eval.temperature for the same reason.
  config.diffusion.own_sample_temperature = 1.0
  # Own samples start at this train step (a warm-up: a young model's own
  # guesses are mostly wrong, and training on them set Duke back).
  config.diffusion.own_sample_start_step = 0

  # SPAD (DESIGN §2 and its table of lost defaults).
  config.spad = ml_collections.ConfigDict()
  config.spad.scd = True
  config.spad.bcd = True
  config.spad.pas = True
  config.spad.sigma0 = 0.5
  config.spad.pas_lambda = 0.05
  config.spad.k0 = 3
  config.spad.k_gamma = 0.01
  config.spad.anchor_ratio = 0.3
  config.spad.components = False  # Targets = classes (False) or components.
  config.spad.anchor_patch = 0  # >1: anchors are square patches of this size.
  config.spad.canny_low = 100.0
  config.spad.canny_high = 200.0
  config.spad.band_width = 5
  # Canny per class (binary maps) instead of on the spread label map; needed
  # when adjacent classes' grey step is below the thresholds (many classes).
  config.spad.bcd_per_class = False
  # Add the label's transition pixels to Canny's edges, which miss ~1-2 %
  # of them (junctions, 1-px holes, border): the band then covers every
  # class transition. False: Canny's edges alone.
  config.spad.bcd_complete = True

  # Optimisation.
  config.train = ml_collections.ConfigDict()
  config.train.batch_size = 8  # Global, over all devices and hosts.
  config.train.num_epochs = 200
  config.train.learning_rate = 1e-4
  config.train.lr_schedule = 'constant'  # constant | cosine | linear.
  config.train.warmup_steps = 0
  config.train.weight_decay = 1e-4
  config.train.decoupled_weight_decay = False  # True: AdamW.
  config.train.grad_clip_norm = 0.0  # 0 disables clipping.
  # model.kind='deterministic': loss = per-pixel CE + dice_weight·soft Dice.
  config.train.dice_weight = 1.0
  config.train.ema_decay = 0.9999
  config.train.log_every_steps = 50
  config.train.checkpoint_every_steps = 1000
  config.train.checkpoints_to_keep = 3
  config.train.max_nonfinite_steps = 20  # Consecutive skipped updates that stop the run.
  # Validate on the val split every this many epochs (0: never): val mIoU/
  # mDice go to the logs and the best-by-val-mDice checkpoint is kept apart.
  config.train.eval_every_epochs = 10
  # The split validated during training ('val'; 'test' or 'train' draw a
  # learning curve where the val split is too small to say anything, and
  # then need eval.checkpoint='latest': no model is selected on them).
  config.train.val_split = 'val'
  # With every validation, also sample the first this many training cases
  # (unaugmented, one chain, the chains' final labels) and log their mDice
  # as train_mDice: whether the model still learns the data it trains on
  # (0: off).
  config.train.monitor_train_cases = 0
  # Stop (after a checkpoint) once this run has trained that many steps; the
  # next run resumes. 0: train to the end. For time-limited jobs; SIGTERM
  # (preemption) does the same at the next step.
  config.train.max_steps_per_run = 0

  # Evaluation / sampling.
  config.eval = ml_collections.ConfigDict()
  config.eval.num_steps = 50  # Sampling steps S (1..T, evenly strided).
  config.eval.num_samples = 1  # Ensemble size N.
  # The reverse step (spad_jax/diffusion.py): 'ancestral' is DESIGN §1's
  # exact posterior mixture, 'x0_resample' draws x_s ~ q(x_s | x0 ~ p̂).
  # temperature sharpens p̂ inside the chain (1: exact); the last mode_last
  # jumps take the most probable class instead of a draw (0: none).
  config.eval.sampler = 'ancestral'
  config.eval.temperature = 1.0
  config.eval.mode_last = 0
  # How N chains combine: 'vote' (majority of their labels; the soft map is
  # the vote fractions), 'mean' (argmax of their mean soft map) or 'medoid'
  # (the chain agreeing best with the others, by Dice; the soft map is the
  # vote's): a majority thins small structures the chains place differently.
  config.eval.ensemble = 'vote'
  # A chain's soft map (calibration, uncertainty, the 'mean' ensemble):
  # 'last' (its final p̂) or 'chain_mean' (the mean of every step's p̂; the
  # final p̂ alone inherits the confidence of errors the chain copied).
  config.eval.soft_map = 'last'
  # A chain's label: 'last' (the argmax of its final p̂) or 'soft_map' (the
  # argmax of its soft map: with 'chain_mean', of the mean of its steps' p̂;
  # better single chains on Duke, less gain from ensembles).
  config.eval.chain_label = 'last'
  # What an ensemble (num_samples > 1) combines: 'chain_label' (each chain's
  # label above) or 'last' (each chain's final p̂'s argmax, its sample): with
  # a pooled chain_label, one chain answers with its steps' pooled p̂ and
  # many vote their samples. One chain is always its own label.
  config.eval.ensemble_of = 'chain_label'
  config.eval.batch_size = 8  # Global.
  config.eval.split = 'test'
  config.eval.num_grid_cases = 6  # Cases shown in the PNG grid.
  # Equal-mass bins of the calibration error (ECE/MCE, reliability diagram).
  config.eval.ece_bins = 15
  # Evaluate on degraded images (spad_jax/data/corruptions.py: none,
  # gaussian_noise, speckle, blur, contrast, gamma, resample, jpeg) at
  # severity 1..5; results go to <workdir>/corruptions/<name>_s<severity>/.
  config.eval.corruption = 'none'
  config.eval.severity = 1
  # Physical size (row, column), e.g. mm, of one pixel of the original images
  # for HD95/ASSD; () reports distances in original-image pixels.
  config.eval.spacing = ()
  # Which checkpoint evaluate/predict load: 'best' (best val mDice), 'latest',
  # or 'auto' (best when the run validated, else latest; the choice is
  # logged and written to metrics.json).
  config.eval.checkpoint = 'auto'
  return config
