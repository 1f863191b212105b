"""Simulation of cryo-EM data with ground truth: atomic models → potentials → particle stacks.

Public API::

    from cryolive.simulate import load_atoms, project_atoms_2d, atoms_to_volume, particle_diameter_angstrom

    atoms = load_atoms("6ny1")                       # or "3j5p", or a PDB/mmCIF path
    proj = project_atoms_2d(atoms, rotations, 128, 1.0)   # (b, 128, 128) projected potential, V·Å
    vol = atoms_to_volume(atoms, 128, 1.0)           # (128, 128, 128) potential map, V, (z, y, x)
"""

from .structure import (
    Atoms,
    atoms_to_volume,
    load_atoms,
    particle_diameter_angstrom,
    project_atoms_2d,
    random_aggregate,
)

__all__ = [
    "Atoms",
    "atoms_to_volume",
    "load_atoms",
    "particle_diameter_angstrom",
    "project_atoms_2d",
    "random_aggregate",
]
