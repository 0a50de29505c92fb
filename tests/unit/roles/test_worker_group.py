"""rlhf_dist.roles.worker_group.actor_error: an actor's failure as one line naming role, rank and node.

Ray's own exception objects, built as Ray 2.60 builds them when an actor's constructor raises
(an ``ActorDiedError`` around a ``RayTaskError``; only its text survives the trip to the driver) or
when its process dies (around an ``ActorDiedErrorContext``). The same messages from real actors:
tests/integration/test_worker_group.py::test_a_constructor_that_raises_is_one_line_naming_role_rank_and_node.
"""

from __future__ import annotations

import traceback

from ray.core.generated.common_pb2 import ActorDiedErrorContext
from ray.exceptions import ActorDiedError, RayTaskError

from rlhf_dist.roles.worker_group import actor_error


def constructor_failure(raise_it) -> ActorDiedError:
    """What ``ray.get`` raises on the driver when an actor's ``__init__`` ran ``raise_it``."""
    try:
        raise_it()
    except (ValueError, OSError) as e:
        name = "ray::ReferenceModel.__init__"
        task_error = RayTaskError(name, traceback.format_exc(), e, proctitle=name, pid=4918, ip="10.0.0.5",
                                  actor_repr="<ReferenceModel object>", actor_id="f51b92")
    return ActorDiedError(task_error)


def _refuse_architecture():
    raise ValueError("model.path='/m': logprobs from the hidden states differ from the model's own logits by 0.393\n"
                     "(this architecture transforms its logits in a way rlhf_dist does not reproduce)")


def _chained():
    try:
        {}["config.json"]
    except KeyError as e:
        raise OSError("/m does not appear to have a file named config.json") from e


def test_a_constructor_that_raised_is_named_with_its_own_exception_and_node():
    error = actor_error("reference", "pid", 0, constructor_failure(_refuse_architecture))
    # The message's two lines joined; no traceback, no "ActorDiedError".
    assert str(error) == (
        "reference rank 0 on node 10.0.0.5 failed to start: ValueError: model.path='/m': logprobs from the hidden "
        "states differ from the model's own logits by 0.393 (this architecture transforms its logits in a way "
        "rlhf_dist does not reproduce)"
    )
    assert not error.lost_actor  # a restart would fail the same way
    # A chained exception: the last one raised, not its cause.
    error = actor_error("policy", "endpoint", 1, constructor_failure(_chained))
    assert str(error) == (
        "policy rank 1 on node 10.0.0.5 failed to start: OSError: /m does not appear to have a file named config.json"
    )


def test_a_dead_process_is_lost_and_names_its_node():
    context = ActorDiedErrorContext(
        class_name="PolicyTrainer", actor_id=bytes(16), pid=6321, node_ip_address="10.0.0.7",
        error_message="The actor is dead because its worker process has died. Worker exit type: SYSTEM_ERROR "
                      "Worker exit detail: Worker unexpectedly exits with a connection error code 2. End of file.",
    )
    error = actor_error("policy", "setup", 1, ActorDiedError(context))
    assert str(error) == "policy.setup: actor rank 1 died (ActorDiedError, exit type SYSTEM_ERROR, node 10.0.0.7)"
    assert error.lost_actor
    # Killed in its constructor (SIGKILL, e.g. the OOM killer): Ray says the actor "never ran"
    context.never_started = True
    error = actor_error("reference", "pid", 0, ActorDiedError(context))
    assert str(error) == (
        "reference.pid: actor rank 0 died while starting (ActorDiedError, exit type SYSTEM_ERROR, node 10.0.0.7)"
    )
