"""`cryoprior data ...` end to end on shipped structures and tiny archives."""

from __future__ import annotations

import argparse
import gzip
import io
import json
import tarfile

import pytest

from cryoprior.cli import data as cli_data
from cryoprior.core.errors import InputError
from cryoprior.data.corpus import shipped_folder, subset_corpus
from cryoprior.data.volumes import CachedMapDataset


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="cryoprior data")
    cli_data.add_args(parser)
    return cli_data.main(parser.parse_args(argv))


def test_list_shows_the_shipped_set_and_demo(capsys) -> None:
    assert _run(["list"]) == 0
    out = capsys.readouterr().out
    assert "1fki_A" in out and "(demo)" in out and "test" in out
    assert len(out.strip().splitlines()) == 21


def test_maps_train_then_validation(tmp_path, capsys) -> None:
    small = tmp_path / "small"
    subset_corpus(
        shipped_folder(),
        small,
        ["3a4r_A", "2xcj_A", "5pti_A"],
        split={"train": ["3a4r_A", "2xcj_A"], "validation": ["5pti_A"]},
    )
    train = tmp_path / "train.safetensors"
    args = ["--corpus", str(small), "--box", "32", "--pixel-size", "3.0", "--n-per-structure", "2"]
    with pytest.raises(InputError, match="scale-from"):
        _run(["maps", str(tmp_path / "v.safetensors"), "--split", "validation", *args])
    assert _run(["maps", str(train), "--split", "train", *args]) == 0
    ds = CachedMapDataset(train)
    assert len(ds) == 4 and ds[0].shape == (1, 32, 32, 32)
    assert ds.metadata["names"] == ["3a4r_A", "2xcj_A"]
    assert ds.metadata["split"]["validation"] == ["5pti_A"]
    val = tmp_path / "val.safetensors"
    assert _run(["maps", str(val), "--split", "validation", *args, "--scale-from", str(train)]) == 0
    assert CachedMapDataset(val).scale == ds.scale
    assert "wrote 2 maps" in capsys.readouterr().out
    with pytest.raises(InputError, match="same box"):
        _run(
            [
                "maps",
                str(val),
                "--split",
                "validation",
                "--corpus",
                str(small),
                "--box",
                "34",
                "--pixel-size",
                "3.0",
                "--scale-from",
                str(train),
            ]
        )


def test_corpus_from_archive(tmp_path, capsys) -> None:
    archive = tmp_path / "tiny-1.0.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        for name in ("2xcj_A", "3a4r_A"):
            data = gzip.decompress((shipped_folder() / f"{name}.pdb.gz").read_bytes())
            info = tarfile.TarInfo(f"tiny-1.0/{name}.pdb")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    out = tmp_path / "corpus"
    assert _run(["corpus", str(out), "--from-archive", str(archive), "--min-residues", "60"]) == 0
    assert "wrote 2 protein chains" in capsys.readouterr().out
    manifest = json.loads((out / "corpus.json").read_text())
    assert sorted(r["name"] for r in manifest["records"]) == ["2xcj_A", "3a4r_A"]
