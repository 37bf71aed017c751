"""Training: config (config.py), optax recipe (optim.py), state (state.py), pure steps (step.py),
mesh and sharding rules (mesh.py), orbax checkpoints (checkpoint.py), the resumable loop (loop.py).

Kept import-free so that `bshadow --help` stays instant; import the submodules you need.
"""
