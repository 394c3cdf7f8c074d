"""File formats: MRC maps and stacks, RELION STAR particle files, PDB/mmCIF/XYZ structures.

Readers validate their input and raise :class:`~cryoprior.core.errors.InputError` naming
the file and the problem; writers are atomic (a file is complete or absent).
"""

from cryoprior.io.mrc import (
    MRCStack,
    StackWriter,
    centred_origin,
    read_map,
    read_map_origin,
    read_stack,
    write_map,
    write_stack,
)
from cryoprior.io.star import (
    Particles,
    check_stack_references,
    read_particle_images,
    read_particles,
    write_particles,
)
from cryoprior.io.structure import (
    THREE_TO_ONE,
    Structure,
    ca_trace,
    chain_sequences,
    read_structure,
    read_xyz,
    write_pdb,
    write_xyz,
)

__all__ = [
    "MRCStack",
    "Particles",
    "StackWriter",
    "Structure",
    "THREE_TO_ONE",
    "ca_trace",
    "centred_origin",
    "chain_sequences",
    "check_stack_references",
    "read_map",
    "read_map_origin",
    "read_particle_images",
    "read_particles",
    "read_stack",
    "read_structure",
    "read_xyz",
    "write_map",
    "write_particles",
    "write_pdb",
    "write_stack",
    "write_xyz",
]
