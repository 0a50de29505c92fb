"""The algorithm math and the data it runs on: torch and the standard library only, no Ray,
DeepSpeed, vLLM or config objects (``stats``, ``advantages``, ``losses``, ``kl``, ``schedule``),
plus the rollout batch (``experience``), its packed layouts (``packing``) and the run's random
streams (``seeds``). Every function takes tensors and floats and is tested against hand-computed
numbers."""
