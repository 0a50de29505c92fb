"""Task content, apart from the system: the built-in tasks' prompts, rewards, corpora, tiny-model
recipes, environments and supervised data.

Pure Python: a task imports only ``tasks.base``, the tasks it shares content with and
``core.seeds``; never torch, Ray or the rest of the package (the ``tasks-pure`` contract in
``pyproject.toml``). Each task module exports one ``TASK`` (a ``base.Task``), found by name through
``rlhf_dist.registry.TASKS``, so a new built-in task is one module here plus one registry line.
"""
