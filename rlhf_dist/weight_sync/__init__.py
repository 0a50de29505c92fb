"""Weight sync from the policy trainer to the vLLM engines: one module per transport.

    transport.py  what every transport shares: parameter specs, buckets, the Transport interface
                  (GroupTransport, HandleTransport), the group senders' failure handling, load_transport
    gloo.py nccl.py ipc.py
                  one transport each, both of its ends: the payloads, the trainer side (sender or
                  exporter) and the vLLM side (its engine class, made on first use)
    reload.py     the vLLM reload lifecycle every engine loads through (and its fix for tied heads)
    verify.py     the probe that checks every engine serves the trainer's policy
    plugin.py     vLLM's entry point: every transport's engine registered in every vLLM process

A new transport is ``<name>.py`` exporting ``TRANSPORT`` plus one line in
``rlhf_dist.registry.TRANSPORTS`` with its static traits, which config validation reads without
importing it. The sync itself (when to send, stage by stage or issued ahead, the probe) is
``rlhf_dist.roles.groups.WeightSync``: it drives the role groups, so it sits above them.
"""
