"""Changing the serving model on a running agent: one package for the whole path, in the order a push takes.

    wire.py      how a bundle travels over MQTT (chunks, acks, resume); its records are in agent/contract
    receiver.py  the agent's side of a transfer: chunks staged on disk, checked, unpacked
    staging.py   staged transfers on disk (staging/<transfer_id>/)
    archive.py   a bundle as a deterministic tar: pack, check, unpack
    worker.py    the `rollout` process: pushes and model commands from operators
    swap.py      install into the store, ask the engine to swap (agent/engine/swap.py), record; or roll back
    store.py     verified bundles on disk, the active one, history for rollback

The operator's side of a push is deploy/sender.py.
"""
