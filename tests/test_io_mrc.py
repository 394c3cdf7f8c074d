"""MRC maps and stacks: round trips, origin convention, memory-mapped reads, bad files."""

from __future__ import annotations

import pickle

import mrcfile
import numpy as np
import pytest
import torch

from cryoprior.core.containers import ImageStack, Volume
from cryoprior.core.errors import InputError
from cryoprior.io.mrc import (
    StackWriter,
    read_map,
    read_map_origin,
    read_stack,
    write_map,
    write_stack,
)


@pytest.mark.parametrize("shape", [(8, 8, 8), (7, 7, 7), (6, 7, 9)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_map_round_trip_keeps_data_pixel_size_and_centred_origin(tmp_path, gen, shape, dtype):
    data = torch.randn(shape, generator=gen, dtype=dtype)
    path = tmp_path / "map.mrc"
    write_map(path, Volume(data, 1.37))

    back = read_map(path)
    assert back.data.dtype == torch.float32
    assert torch.equal(back.data, data.float())
    assert back.pixel_size == 1.37
    nz, ny, nx = shape
    expected = (-(nx // 2) * 1.37, -(ny // 2) * 1.37, -(nz // 2) * 1.37)
    np.testing.assert_allclose(read_map_origin(path), expected, rtol=1e-6)
    with mrcfile.open(path) as mrc:
        assert mrc.header.mode == 2 and mrc.header.ispg == 1
        assert (mrc.header.nx, mrc.header.ny, mrc.header.nz) == (nx, ny, nz)


def test_write_map_explicit_origin(tmp_path):
    path = tmp_path / "map.mrc"
    write_map(path, Volume(torch.zeros(4, 4, 4), 2.0), origin_angstrom=(1.5, -2.0, 3.25))
    assert read_map_origin(path) == (1.5, -2.0, 3.25)


def test_read_map_pixel_size_override_and_zero_voxel_size(tmp_path):
    path = tmp_path / "novoxel.mrc"
    with mrcfile.new(path) as mrc:
        mrc.set_data(np.ones((4, 4, 4), dtype=np.float32))
        mrc.voxel_size = 0.0
    with pytest.raises(InputError, match="pixel size") as info:
        read_map(path)
    assert "novoxel.mrc" in str(info.value)
    assert read_map(path, pixel_size=1.2).pixel_size == 1.2


def test_truncated_map_raises_input_error(tmp_path):
    path = tmp_path / "cut.mrc"
    write_map(path, Volume(torch.ones(10, 10, 10), 1.0))
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - 100])
    with pytest.raises(InputError, match="truncated") as info:
        read_map(path)
    assert "cut.mrc" in str(info.value)
    with pytest.raises(InputError, match="truncated"):
        read_stack(path)


def test_not_an_mrc_file_and_missing_file(tmp_path):
    junk = tmp_path / "junk.mrc"
    junk.write_bytes(b"hello" * 400)
    with pytest.raises(InputError, match="junk.mrc"):
        read_map(junk)
    with pytest.raises(InputError, match="not found"):
        read_map(tmp_path / "absent.mrc")


def test_read_map_rejects_a_2d_image(tmp_path):
    path = tmp_path / "image.mrc"
    with mrcfile.new(path) as mrc:
        mrc.set_data(np.ones((5, 6), dtype=np.float32))
        mrc.voxel_size = 1.0
    with pytest.raises(InputError, match="2-D image"):
        read_map(path)


def test_read_map_applies_axis_order(tmp_path):
    # Stored with sections = x, rows = y, columns = z (mapc=3, mapr=2, maps=1).
    zyx = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    path = tmp_path / "permuted.mrc"
    with mrcfile.new(path) as mrc:
        mrc.set_data(np.ascontiguousarray(zyx.transpose(2, 1, 0)))
        mrc.header.mapc, mrc.header.mapr, mrc.header.maps = 3, 2, 1
        mrc.voxel_size = 1.0
    np.testing.assert_array_equal(read_map(path).data.numpy(), zyx)


@pytest.mark.parametrize("shape", [(6, 6), (5, 7)])
def test_stack_chunked_write_and_memmap_read(tmp_path, gen, shape):
    n = 11
    images = torch.randn(n, *shape, generator=gen)
    path = tmp_path / "stack.mrcs"
    with StackWriter(path, n, shape, 1.6) as out:
        for start in range(0, n, 4):  # chunks of 4, 4, 3
            out.write(start, images[start : start + 4])

    with mrcfile.open(path) as mrc:
        assert mrc.header.ispg == 0 and mrc.header.mode == 2 and mrc.header.mz == 1
        assert mrc.header.nz == n
        assert mrc.header.dmax == pytest.approx(images.max().item())
        assert mrc.header.dmean == pytest.approx(images.mean().item(), abs=1e-5)
        assert mrc.header.rms == pytest.approx(images.std(unbiased=False).item(), rel=1e-4)

    stack = read_stack(path)
    assert len(stack) == n and stack.shape == shape and stack.pixel_size == 1.6
    assert isinstance(stack._array(), np.memmap)
    subset = stack.get([9, 2, 2, 0])
    assert subset.dtype == torch.float32 and subset.shape == (4, *shape)
    assert torch.equal(subset, images[[9, 2, 2, 0]])
    assert torch.equal(stack.get(slice(3, 6)), images[3:6])
    assert torch.equal(pickle.loads(pickle.dumps(stack)).get(10), images[10:11])
    stack.close()

    in_memory = read_stack(path, mmap=False)
    assert torch.equal(in_memory.read_all().data, images)
    with pytest.raises(InputError, match="out of range"):
        in_memory.get([n])


def test_single_image_file_is_a_stack_of_one(tmp_path):
    path = tmp_path / "one.mrc"
    image = np.arange(20, dtype=np.float32).reshape(4, 5)
    with mrcfile.new(path) as mrc:
        mrc.set_data(image)
        mrc.voxel_size = 2.5
    stack = read_stack(path)
    assert len(stack) == 1 and stack.shape == (4, 5) and stack.pixel_size == 2.5
    np.testing.assert_array_equal(stack.get(0)[0].numpy(), image)


def test_stack_writer_leaves_no_file_on_error_or_when_incomplete(tmp_path):
    path = tmp_path / "bad.mrcs"
    with pytest.raises(KeyError), StackWriter(path, 4, (3, 3), 1.0) as out:
        out.write(0, np.ones((2, 3, 3)))
        raise KeyError("boom")
    with (
        pytest.raises(RuntimeError, match="never written"),
        StackWriter(path, 4, (3, 3), 1.0) as out,
    ):
        out.write(0, np.ones((2, 3, 3)))
    with pytest.raises(InputError, match="outside"), StackWriter(path, 4, (3, 3), 1.0) as out:
        out.write(3, np.ones((2, 3, 3)))
    assert list(tmp_path.iterdir()) == []


def test_write_stack_round_trip(tmp_path, gen):
    images = torch.randn(3, 8, 8, generator=gen)
    write_stack(tmp_path / "s.mrcs", ImageStack(images, 0.9), chunk=2)
    back = read_stack(tmp_path / "s.mrcs", mmap=False).read_all()
    assert torch.equal(back.data, images) and back.pixel_size == 0.9
