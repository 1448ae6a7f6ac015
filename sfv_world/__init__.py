"""sfv-world: STARFlow-V world models served as Gymnasium environments.

Layers, bottom up (DESIGN.md section 2): ``sfv_world.datasets`` -> model (``sfv_world``) ->
world runtime -> ``sfv_world.envs`` -> ``sfv_world.agents`` / ``sfv_world.apps``.
"""

__version__ = "0.1.0"
