"""Training: config (config.py), optax recipe (optim.py), state (state.py), pure steps (step.py), the
jitted and sharded step builder every caller uses (compiled.py), mesh and sharding rules (mesh.py),
orbax checkpoint writing and resume (checkpoint.py), the resumable loop (loop.py).

Kept import-free so that `bshadow --help` stays instant; import the submodules you need.
"""
