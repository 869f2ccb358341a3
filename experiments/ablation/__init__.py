"""The SPAD ablation study: arms x seeds, sweeps, statistics and report."""
