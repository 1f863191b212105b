"""Simulation of cryo-EM data with ground truth: atomic models → potentials → particle stacks and movies.

Public API::

    from cryolive.simulate import (
        load_atoms, project_atoms_2d, atoms_to_volume, particle_diameter_angstrom,
        simulate_particle_stack, SimulationSettings, simulate_dataset, replay, simulate_live,
    )

    atoms = load_atoms("6ny1")                              # or "3j5p", or a PDB/mmCIF path
    proj = project_atoms_2d(atoms, rotations, 128, 1.0)     # (b, 128, 128) projected potential, V·Å
    vol = atoms_to_volume(atoms, 128, 1.0)                  # (128, 128, 128) potential, V, (z, y, x)
    images, truth = simulate_particle_stack(["6ny1", "3j5p"], 2000, 64, 2.5, seed=1)   # extracted particles
    summary = simulate_dataset("OUT", SimulationSettings(n_movies=8, seed=0))       # movies + ground truth
    replay("OUT", "watch", interval_s=10)                    # feed movies to a watched folder
    simulate_live("OUT", "watch", SimulationSettings(n_movies=20), interval_s=10)

Physics: International Tables electron scattering factors; weak-phase + amplitude-contrast imaging
with the CTF of :mod:`cryolive.ctf`; vitreous ice (water structure factor, solvent displacement,
inelastic loss); radiation damage; drift and local motion; Poisson counts, gain and hot pixels.
See :mod:`cryolive.simulate.physics` and :mod:`cryolive.simulate.movies`.
"""

from .dataset import simulate_dataset
from .movies import MovieSimulator, SimulationSettings
from .particles import noiseless_particle_images, simulate_particle_stack
from .replay import replay, simulate_live
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
    "simulate_particle_stack",
    "noiseless_particle_images",
    "SimulationSettings",
    "MovieSimulator",
    "simulate_dataset",
    "replay",
    "simulate_live",
]
