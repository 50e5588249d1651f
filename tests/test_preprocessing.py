"""The decode-once image cache, its equivalence with the tutorial's transforms, ImageBatches, and the benchmark."""

import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image
from torchvision import transforms

from conftest import REPO, make_flowers_root, real_photos
from datasets.batches import ImageBatches
from datasets.cache import cache_path, cached_images
from datasets.decoding import decode_images, load_image
from datasets.flowers102 import flowers102_files
from vae.errors import UserError


@pytest.fixture(scope="module")
def fifty_root(tmp_path_factory):
    """A Flowers102 root whose train split holds 50 real JPEGs."""
    return make_flowers_root(tmp_path_factory.mktemp("fifty"), train=50, val=2, test=2)


@pytest.fixture
def small_root(tmp_path):
    """A root of our own, free to be modified by the test."""
    return make_flowers_root(tmp_path / "data", train=6, val=2, test=2)


@pytest.fixture
def decode_calls(monkeypatch):
    """Counts how often the JPEGs are actually decoded (a cache miss)."""
    calls = []
    original = decode_images

    def counting(files, *args, **kwargs):
        calls.append(len(files))
        return original(files, *args, **kwargs)

    monkeypatch.setattr("datasets.cache.decode_images", counting)
    return calls


def cache_files(folder):
    return sorted(p.name for p in folder.glob("*.pt"))


def test_cache_is_within_one_level_of_torchvision_resize(fifty_root, tmp_path):
    if not real_photos(50):  # JPEG draft decoding is measured on the photos it is for, not on drawings
        pytest.skip("needs 50 real Flowers102 photos in ../shared/data/flowers102-train or datasets/flowers-102")
    images = cached_images(fifty_root, "train", 32, cache_dir=tmp_path, next_to_data=False)
    tutorial = transforms.Compose([transforms.Resize((32, 32)), transforms.ToTensor()])
    reference = []
    for path in flowers102_files(fifty_root, "train"):
        with Image.open(path) as image:
            reference.append(tutorial(image.convert("RGB")))
    reference = torch.stack(reference)
    assert images.shape == (50, 3, 32, 32) and images.dtype == torch.uint8
    mean_difference = (images.float() / 255 - reference).abs().mean().item()
    assert mean_difference <= 1 / 255, f"mean difference {mean_difference * 255:.2f}/255"


def test_cache_is_reused_and_rebuilt_when_a_file_or_the_resolution_changes(small_root, decode_calls):
    folder = small_root / "flowers-102" / "cache"
    first = cached_images(small_root, "train", 32)
    assert decode_calls == [6] and len(cache_files(folder)) == 1
    assert torch.equal(cached_images(small_root, "train", 32), first)
    assert decode_calls == [6], "an unchanged data set must be loaded from the cache"

    image = flowers102_files(small_root, "train")[0]
    stat = image.stat()
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    cached_images(small_root, "train", 32)
    assert len(decode_calls) == 2, "a new mtime must rebuild the cache"
    assert len(cache_files(folder)) == 1, "the stale cache must be deleted"

    stat = image.stat()
    with open(image, "ab") as file:
        file.write(b"\0")  # bytes after the JPEG's end marker: same picture, another size
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    cached_images(small_root, "train", 32)
    assert len(decode_calls) == 3, "a new size must rebuild the cache"

    assert cached_images(small_root, "train", 64).shape == (6, 3, 64, 64)
    assert len(decode_calls) == 4
    assert len(cache_files(folder)) == 2, "each resolution keeps its own cache"
    cached_images(small_root, "train", 32)
    cached_images(small_root, "test", 32)
    assert len(decode_calls) == 5 and len(cache_files(folder)) == 3


def test_cache_goes_to_cache_dir_when_the_data_folder_is_read_only(small_root, tmp_path, decode_calls):
    data_folder = small_root / "flowers-102"
    cache_dir = tmp_path / "user-cache"
    data_folder.chmod(0o555)
    try:
        images = cached_images(small_root, "train", 32, cache_dir=str(cache_dir))
        again = cached_images(small_root, "train", 32, cache_dir=str(cache_dir))
    finally:
        data_folder.chmod(0o755)
    assert not (data_folder / "cache").exists()
    assert len(cache_files(cache_dir)) == 1 and torch.equal(images, again) and len(decode_calls) == 1
    files = flowers102_files(small_root, "train")
    data_folder.chmod(0o555)
    try:
        assert cache_path(small_root, "train", 32, files, str(cache_dir)).parent == cache_dir
    finally:
        data_folder.chmod(0o755)


def test_two_roots_sharing_a_cache_dir_keep_their_caches(tmp_path, decode_calls):
    first = make_flowers_root(tmp_path / "a", train=4, val=1, test=1)
    second = make_flowers_root(tmp_path / "b", train=5, val=1, test=1)
    for root in (first, second, first, second):
        cached_images(root, "train", 32, cache_dir=tmp_path / "cache", next_to_data=False)
    assert decode_calls == [4, 5] and len(cache_files(tmp_path / "cache")) == 2


def test_a_damaged_cache_is_rebuilt(small_root, decode_calls):
    images = cached_images(small_root, "train", 32)
    path = cache_path(small_root, "train", 32, flowers102_files(small_root, "train"))
    path.write_bytes(b"not a torch file")
    assert torch.equal(cached_images(small_root, "train", 32), images) and len(decode_calls) == 2
    torch.save({"images": torch.zeros(6, 3, 16, 16, dtype=torch.uint8)}, path)  # readable, but not this cache
    assert torch.equal(cached_images(small_root, "train", 32), images) and len(decode_calls) == 3


def test_a_corrupt_jpeg_names_the_file_or_is_skipped_and_counted(small_root, tmp_path, capsys):
    files = flowers102_files(small_root, "train")
    bad = files[2]
    bad.write_bytes(bad.read_bytes()[:300])  # a truncated JPEG
    with pytest.raises(UserError, match=bad.name):
        cached_images(small_root, "train", 32)
    images = cached_images(small_root, "train", 32, skip_bad_images=True)
    assert len(images) == 5 and "skipped 1 unreadable" in capsys.readouterr().err

    # Through the worker pool (it starts from 128 files with 2 workers): the error crosses the process boundary.
    many = files * 22
    with pytest.raises(UserError, match=bad.name):
        decode_images(many, 32, num_workers=2)
    pooled, kept = decode_images(many, 32, num_workers=2, skip_bad_images=True)
    assert len(pooled) == len(kept) == 5 * 22 and bad not in kept

    # The cache that left it out serves --skip-bad-images again, and says so; without the flag the bad file
    # still stops the run by name, and the cache stays for the next --skip-bad-images run.
    cache = cache_path(small_root, "train", 32, files)
    assert cache.is_file() and torch.equal(cached_images(small_root, "train", 32, skip_bad_images=True), images)
    assert "skipped 1 unreadable image(s) of the 'train' split (as when its cache was built)" in capsys.readouterr().err
    with pytest.raises(UserError, match=bad.name):
        cached_images(small_root, "train", 32)
    assert cache.is_file()
    bad.write_bytes(files[0].read_bytes())  # the bad file repaired: one new cache of all six, for both kinds of run
    assert len(cached_images(small_root, "train", 32)) == 6
    repaired = cache_path(small_root, "train", 32, files)
    assert len(cached_images(small_root, "train", 32, skip_bad_images=True)) == 6
    assert [p.name for p in repaired.parent.glob("*.pt")] == [repaired.name]  # the older one was replaced


def test_parallel_and_serial_decoding_agree(fifty_root):
    files = flowers102_files(fifty_root, "train") * 3
    parallel, _ = decode_images(files, 32, num_workers=2)
    serial, _ = decode_images(files, 32, num_workers=1)
    assert torch.equal(parallel, serial)
    assert torch.equal(serial[0], load_image(files[0], 32))


# ------------------------------------------------------------------------------------------- ImageBatches

def numbered_images(count):
    """uint8 images whose pixels all hold the image's index, so a batch tells which images it holds."""
    return torch.arange(count, dtype=torch.uint8).view(count, 1, 1, 1).expand(count, 3, 4, 4).contiguous()


def served(batches, epoch, start_batch=0):
    return [(x[:, 0, 0, 0] * 255).round().long().tolist() for x in batches.epoch(epoch, start_batch)]


def test_batches_are_seeded_per_epoch_and_cover_every_image_once():
    batches = ImageBatches(numbered_images(100), batch_size=16, device="cpu", seed=3)
    epoch_one = served(batches, 1)
    assert epoch_one == served(ImageBatches(numbered_images(100), 16, "cpu", seed=3), 1)
    assert epoch_one != served(batches, 2)
    assert epoch_one != served(ImageBatches(numbered_images(100), 16, "cpu", seed=4), 1)
    flat = [i for batch in epoch_one for i in batch]
    assert sorted(flat) == list(range(100))
    assert len(epoch_one) == len(batches) == 7 and [len(b) for b in epoch_one] == [16] * 6 + [4]
    assert served(batches, 1, start_batch=2) == epoch_one[2:]
    assert served(batches, 1, start_batch=7) == []


def test_rank_shards_are_disjoint_equal_and_cover_the_epoch_but_the_remainder():
    for epoch in (5, 6):
        shards = []
        for rank in range(3):
            batches = ImageBatches(numbered_images(100), 8, "cpu", seed=0, rank=rank, world_size=3)
            shard = served(batches, epoch)
            assert len(shard) == len(batches) == 5  # every rank takes the same number of steps, as DDP needs
            shards.append([i for batch in shard for i in batch])
        # 100 = 3 * 33 + 1: one shuffled image sits out each epoch, the rest are served exactly once.
        assert [len(s) for s in shards] == [33] * 3 and len(set(sum(shards, []))) == 99
    evaluation = [ImageBatches(numbered_images(100), 8, "cpu", shuffle=False, rank=r, world_size=3) for r in range(3)]
    assert sorted(i for b in evaluation for batch in served(b, 0) for i in batch) == list(range(100))
    with pytest.raises(ValueError):
        ImageBatches(numbered_images(10), 8, "cpu", rank=3, world_size=3)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))])
def test_batches_are_floats_in_unit_range_on_the_device(device):
    images = torch.tensor([0, 128, 255], dtype=torch.uint8).repeat(10, 3, 4, 1)
    batches = ImageBatches(images, 4, device, shuffle=False)
    for x in batches.epoch(0):
        assert x.dtype == torch.float32 and x.device.type == device
        assert x.min().item() == 0.0 and x.max().item() == 1.0
    assert torch.equal(next(batches.epoch(0)).cpu(), images[:4].float() / 255)


# -------------------------------------------------------------------------------------------- benchmark

def last_json_line(text):
    return json.loads(text.strip().splitlines()[-1])


def test_benchmark_runs_end_to_end(flowers_root, capsys):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import throughput
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    assert throughput.main(["--data-dir", str(flowers_root), "--replicate", "40", "--batch-size", "8",
                            "--steps", "2", "--seconds", "1", "--rounds", "1", "--warmup-steps", "1",
                            "--seed-workers", "1", "--num-workers", "1"]) == 0
    figures = last_json_line(capsys.readouterr().out)
    for key in ("seed_img_s", "project_img_s", "compute_img_s", "cache_build_s", "cache_load_s"):
        assert figures[key] > 0, key
    assert figures["num_images"] == 40


@pytest.mark.slow  # a subprocess
def test_benchmark_command_line_cache_only(flowers_root):
    command = [sys.executable, str(REPO / "benchmarks" / "throughput.py"), "--data-dir", str(flowers_root),
               "--cache-only", "--num-workers", "1"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    figures = last_json_line(result.stdout)
    assert figures["cache_build_s"] > 0 and figures["cache_load_s"] > 0 and "seed_img_s" not in figures
    assert figures["cache_tensor_bytes"] == 32 * 3 * 32 * 32 <= figures["cache_file_bytes"]
