"""The Hydra configs (a package so that the wheel carries them: pkg://rlhf_dist.conf)."""
