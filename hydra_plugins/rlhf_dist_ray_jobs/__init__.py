"""``hydra/launcher=ray_jobs``: each trial of a multirun as its own Ray job on a running cluster
(``docs/cluster.md``). Hydra finds it in the ``hydra_plugins`` namespace package, which has no
``__init__.py`` of its own. Hydra imports every plugin module whenever an application starts: the
launcher loads Ray only when it launches. Its pure parts are ``rlhf_dist/driver/sweep_jobs.py``."""
