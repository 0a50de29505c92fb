"""A step's rollout: generated ahead on the engines and scored as it streams (``queue``), the
forward passes started on it before the update (``passes``), and every change to the scores
between the reward actors and the advantages (``scoring``)."""
