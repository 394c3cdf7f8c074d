"""Training data: real protein chains, maps and Cα clouds from them, conformers, digits.

Splits are by protein (or molecule) identity, never by random sample, and every data set
records the split it came from. Sources and licences: docs/DATA-SOURCES.md.
"""

from cryoprior.data.corpus import (
    ProteinRecord,
    build_corpus,
    demo_record,
    load_corpus,
    shipped_manifest,
    shipped_records,
)
from cryoprior.data.images import DigitImages, load_digits, load_mnist, mnist_dataset
from cryoprior.data.pointclouds import CalphaDataset
from cryoprior.data.sequences import identity_matrix, sequence_identity
from cryoprior.data.splits import check_split, read_split, split_by_identity, write_split
from cryoprior.data.volumes import CachedMapDataset, MapDataset

__all__ = [
    "CachedMapDataset",
    "CalphaDataset",
    "DigitImages",
    "MapDataset",
    "ProteinRecord",
    "build_corpus",
    "check_split",
    "demo_record",
    "identity_matrix",
    "load_corpus",
    "load_digits",
    "load_mnist",
    "mnist_dataset",
    "read_split",
    "sequence_identity",
    "shipped_manifest",
    "shipped_records",
    "split_by_identity",
    "write_split",
]
