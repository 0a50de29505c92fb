"""The run's services around the loop: data (prompt sets, SFT and preference rows), the run's
logs and a step's metrics with their watchers, the timeline, preemption and sweep summaries.
Nothing here starts or calls an actor."""
