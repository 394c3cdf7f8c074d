"""Sequence identity and identity-based splits, including the shipped set's fixed split."""

from __future__ import annotations

import numpy as np
import pytest

from cryoprior.core.errors import InputError
from cryoprior.data.corpus import shipped_manifest, shipped_records
from cryoprior.data.sequences import STANDARD_AA, identity_matrix, sequence_identity
from cryoprior.data.splits import (
    SplitError,
    check_split,
    cluster_by_identity,
    read_split,
    split_by_identity,
    write_split,
)


def _random_seq(rng: np.random.Generator, n: int) -> str:
    return "".join(rng.choice(list(STANDARD_AA), n))


def _mutate(rng: np.random.Generator, seq: str, fraction: float) -> str:
    s = list(seq)
    for i in rng.choice(len(s), int(fraction * len(s)), replace=False):
        s[i] = rng.choice([a for a in STANDARD_AA if a != s[i]])
    return "".join(s)


def _families(n_families: int = 8, members: int = 3, seed: int = 0) -> dict[str, str]:
    """Families of sequences 80 % identical within, unrelated (random) between."""
    rng = np.random.default_rng(seed)
    out = {}
    for f in range(n_families):
        base = _random_seq(rng, int(rng.integers(70, 130)))
        for m in range(members):
            out[f"fam{f}_{m}"] = _mutate(rng, base, 0.2) if m else base
    return out


def test_identity_basic_cases() -> None:
    seq = "MKVLAAGIRSTPEDWYFHNQCM"
    assert sequence_identity(seq, seq) == 1.0
    # a fragment of a longer protein is identical over the aligned region
    assert sequence_identity(seq[5:18], seq) == 1.0
    one_sub = seq[:10] + ("A" if seq[10] != "A" else "G") + seq[11:]
    assert sequence_identity(seq, one_sub) == pytest.approx(21 / 22)
    assert sequence_identity(seq, "") == 0.0
    assert sequence_identity("XXXX", "XXXX") == 0.0  # unknown residues never match
    with pytest.raises(InputError):
        sequence_identity("MK1V", "MKV")


def test_identity_separates_related_from_unrelated() -> None:
    rng = np.random.default_rng(1)
    base = _random_seq(rng, 120)
    related = _mutate(rng, base, 0.5)  # 50 % identical by construction
    unrelated = [_random_seq(rng, int(n)) for n in rng.integers(50, 160, 10)]
    assert 0.45 <= sequence_identity(base, related) <= 0.6
    assert max(sequence_identity(base, u) for u in unrelated) < 0.3
    m = identity_matrix([base, related, *unrelated[:3]])
    np.testing.assert_allclose(m, m.T)
    np.testing.assert_allclose(np.diag(m), 1.0)


def test_clusters_are_the_families() -> None:
    fams = _families()
    labels = cluster_by_identity(list(fams.values()), 0.3)
    names = list(fams)
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            assert (labels[i] == labels[j]) == (a.split("_")[0] == b.split("_")[0])


@pytest.mark.parametrize("seed", [0, 3])
def test_split_keeps_families_whole_and_is_clean(seed: int) -> None:
    fams = _families(n_families=10)
    split = split_by_identity(fams, (0.6, 0.2, 0.2), threshold=0.3, seed=seed)
    assert sorted(sum(split.values(), [])) == sorted(fams)
    where = {n: s for s, ns in split.items() for n in ns}
    for n in fams:
        family = [m for m in fams if m.split("_")[0] == n.split("_")[0]]
        assert {where[m] for m in family} == {where[n]}
    assert all(len(split[s]) > 0 for s in split)
    worst = check_split(split, fams, 0.3)
    assert set(worst) == set(split["validation"]) | set(split["test"])
    assert max(worst.values()) < 0.3
    assert split == split_by_identity(fams, (0.6, 0.2, 0.2), threshold=0.3, seed=seed)


def test_check_split_rejects_leaks() -> None:
    fams = _families(n_families=3)
    leaky = {
        "train": ["fam0_0", "fam1_0", "fam2_0", "fam2_1", "fam2_2", "fam1_1"],
        "validation": ["fam1_2"],
        "test": ["fam0_1", "fam0_2"],
    }
    with pytest.raises(SplitError, match="identical to training protein"):
        check_split(leaky, fams, 0.3)
    with pytest.raises(SplitError, match="both"):
        check_split({"train": ["fam0_0"], "validation": [], "test": ["fam0_0"]}, fams)
    with pytest.raises(SplitError, match="not among"):
        check_split({"train": ["nope"], "validation": [], "test": []}, fams)


def test_pinned_sequences_pull_their_cluster() -> None:
    fams = _families(n_families=6)
    rng = np.random.default_rng(7)
    pin = _mutate(rng, fams["fam4_0"], 0.1)  # a homologue of family 4, not itself a record
    split = split_by_identity(fams, (1.0, 0.0, 0.0), seed=0, pinned={"test": [pin]})
    assert split["test"] == ["fam4_0", "fam4_1", "fam4_2"]
    assert split["validation"] == []
    with pytest.raises(InputError):
        split_by_identity(fams, pinned={"holdout": [pin]})


def test_split_json_round_trip(tmp_path) -> None:
    split = {"train": ["a", "b"], "validation": ["c"], "test": ["d"]}
    write_split(tmp_path / "split.json", split, threshold=0.3, seed=4)
    assert read_split(tmp_path / "split.json") == split
    (tmp_path / "bad.json").write_text('{"train": []}')
    with pytest.raises(InputError):
        read_split(tmp_path / "bad.json")


def test_shipped_split_is_clean_and_holds_the_demo() -> None:
    manifest = shipped_manifest()
    records = shipped_records()
    split = manifest["split"]
    assert len(records) >= 12
    assert len(split["test"]) >= 5
    assert manifest["demo"] in split["test"]
    worst = check_split(split, records, threshold=0.3)
    assert max(worst.values()) < 0.3
    demo = next(r for r in records if r.name == manifest["demo"])
    assert 100 <= demo.n_residues <= 150
    assert {r.name for r in records} == set(sum(split.values(), []))
    assert all(r.path.is_file() for r in records)
