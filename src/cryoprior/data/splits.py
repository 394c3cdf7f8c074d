"""Training / validation / test splits by protein identity, never by random sample.

Proteins are clustered by single linkage at a sequence-identity threshold (two proteins
share a cluster if a chain of pairs each >= ``threshold`` identical joins them; identity as
defined in :mod:`cryoprior.data.sequences`). Whole clusters go to one split, so no
validation or test protein is >= ``threshold`` identical to any training protein. Every
data set stores the split it was made from (:func:`write_split`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components

from cryoprior.core.errors import InputError
from cryoprior.core.files import write_text_atomic
from cryoprior.data.sequences import identity_matrix, sequence_identity

#: Split names, in the order of the ``fractions`` argument.
SPLITS = ("train", "validation", "test")


class SplitError(InputError):
    """A split leaks: a validation/test protein is too similar to a training protein."""


class _Named(Protocol):
    name: str
    sequence: str


Records = Sequence[_Named] | Mapping[str, str]


def _as_mapping(records: Records) -> dict[str, str]:
    if isinstance(records, Mapping):
        out = {str(k): str(v) for k, v in records.items()}
    else:
        out = {}
        for r in records:
            if r.name in out:
                raise InputError(f"two records are named {r.name!r}; names must be unique")
            out[r.name] = r.sequence
    if not out:
        raise InputError("no records to split")
    return out


def cluster_by_identity(sequences: Sequence[str], threshold: float = 0.3) -> np.ndarray:
    """Single-linkage cluster labels (n,) int: pairs >= ``threshold`` identical are joined."""
    if not 0.0 < threshold <= 1.0:
        raise InputError(f"identity threshold must be in (0, 1], got {threshold}")
    adjacency = identity_matrix(sequences) >= threshold
    _, labels = connected_components(csr_matrix(adjacency), directed=False)
    return labels


def split_by_identity(
    records: Records,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    threshold: float = 0.3,
    seed: int = 0,
    pinned: Mapping[str, Iterable[str]] | None = None,
) -> dict[str, list[str]]:
    """Split records into train / validation / test by whole identity clusters.

    Args:
        records: objects with ``name`` and ``sequence`` (one-letter codes), or a mapping
            name -> sequence.
        fractions: target fractions of proteins for (train, validation, test); normalised.
        threshold: identity at or above which two proteins are linked (0.3 = 30 %).
        seed: the random order in which clusters are dealt out.
        pinned: split name -> sequences that must stay in that split. Every cluster holding
            a record >= ``threshold`` identical to a pinned sequence goes to that split
            ("test" wins over "validation" over "train"). Use it to keep a corpus's test
            proteins apart from proteins held out elsewhere (e.g. the demo protein).

    Returns:
        ``{"train": [...], "validation": [...], "test": [...]}``, names sorted.

    Clusters are dealt largest first (ties in seeded random order), each to the split
    furthest below its target count.
    """
    seqs = _as_mapping(records)
    frac = np.asarray(fractions, dtype=np.float64)
    if frac.shape != (3,) or (frac < 0).any() or frac.sum() <= 0:
        raise InputError(
            f"fractions must be 3 numbers >= 0 (train, validation, test), got {tuple(fractions)}"
        )
    frac = frac / frac.sum()
    names = list(seqs)
    labels = cluster_by_identity([seqs[n] for n in names], threshold)
    n_clusters = int(labels.max()) + 1

    forced: dict[int, int] = {}
    for split_name, pinned_seqs in (pinned or {}).items():
        if split_name not in SPLITS:
            raise InputError(f"pinned split must be one of {SPLITS}, got {split_name!r}")
        rank = SPLITS.index(split_name)
        for p in pinned_seqs:
            for i, n in enumerate(names):
                if sequence_identity(p, seqs[n]) >= threshold:
                    forced[int(labels[i])] = max(forced.get(int(labels[i]), 0), rank)

    sizes = np.bincount(labels, minlength=n_clusters)
    counts = np.zeros(3)
    assignment = np.full(n_clusters, -1)
    for c, rank in forced.items():
        assignment[c] = rank
        counts[rank] += sizes[c]
    rng = np.random.default_rng(seed)
    free = [c for c in rng.permutation(n_clusters) if c not in forced]
    free.sort(key=lambda c: -sizes[c])  # stable: ties keep the seeded order
    targets = frac * len(names)
    for c in free:
        deficit = np.where(frac > 0, targets - counts, -np.inf)
        rank = int(np.argmax(deficit))
        assignment[c] = rank
        counts[rank] += sizes[c]
    return {
        s: sorted(n for i, n in enumerate(names) if assignment[labels[i]] == k)
        for k, s in enumerate(SPLITS)
    }


def check_split(
    split: Mapping[str, Sequence[str]], records: Records, threshold: float = 0.3
) -> dict[str, float]:
    """Raise :class:`SplitError` unless the split is clean; return each held-out protein's
    highest identity to any training protein.

    Clean means: every name is a known record, no name is in two splits, and no validation
    or test protein is >= ``threshold`` identical to a training protein.
    """
    seqs = _as_mapping(records)
    unknown = set(split) - set(SPLITS)
    if unknown:
        raise SplitError(f"unknown split names {sorted(unknown)}; expected {SPLITS}")
    seen: dict[str, str] = {}
    for s in SPLITS:
        for n in split.get(s, []):
            if n not in seqs:
                raise SplitError(f"split {s!r} names {n!r}, which is not among the records")
            if n in seen:
                raise SplitError(f"{n!r} is in both {seen[n]!r} and {s!r}")
            seen[n] = s
    train = list(split.get("train", []))
    worst: dict[str, float] = {}
    for s in ("validation", "test"):
        for n in split.get(s, []):
            ids = [(sequence_identity(seqs[n], seqs[t]), t) for t in train]
            best, partner = max(ids) if ids else (0.0, "")
            if best >= threshold:
                raise SplitError(
                    f"{s} protein {n!r} is {100 * best:.0f}% identical to training protein "
                    f"{partner!r} (threshold {100 * threshold:.0f}%): move them to one split"
                )
            worst[n] = best
    return worst


def write_split(path: str | os.PathLike, split: Mapping[str, Sequence[str]], **info: Any) -> None:
    """Write ``split`` (plus any extra ``info``, e.g. threshold and seed) as JSON."""
    payload = {"identity": "matches / aligned region (cryoprior.data.sequences)"}
    payload.update(info)
    payload.update({s: list(split.get(s, [])) for s in SPLITS})
    write_text_atomic(path, json.dumps(payload, indent=1) + "\n")


def read_split(path: str | os.PathLike) -> dict[str, list[str]]:
    """Read a split written by :func:`write_split` (the three name lists only)."""
    path = Path(path)
    try:
        payload = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"cannot read split file {path}: {e}") from None
    missing = [s for s in SPLITS if s not in payload]
    if missing:
        raise InputError(f"split file {path} lacks {missing}; write it with write_split()")
    return {s: list(payload[s]) for s in SPLITS}
