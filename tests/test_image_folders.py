"""Any folder of images is a data set: flat or one sub-folder per class, photos of any size and format, squashed or
centre-cropped the same way in training and inference. Through the CLIs, as a user runs them."""

import json
import shlex

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY, real_flower_files, train
from datasets.decoding import decode_rgb, load_image
from datasets.folders import flower_classes, folder_files, is_image_folder
from datasets.preprocessing import images_and_names
from vae_inference import main as inference_main


def make_image_folder(root, classes=("daisy", "rose", "tulip"), per_class=12):
    """Real photos, copied into one sub-folder per class, cut to mixed sizes and saved in mixed formats."""
    sources = iter(real_flower_files(len(classes) * per_class))
    formats = [("jpg", "JPEG"), ("png", "PNG"), ("webp", "WEBP"), ("JPEG", "JPEG")]
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            with Image.open(next(sources)) as photo:
                photo = photo.convert("RGB").resize((160 + 37 * (i % 4), 120 + 53 * (i % 3)))
            suffix, kind = formats[(c + i) % len(formats)]
            photo.save(root / name / f"{name}-{i}.{suffix}", kind)
    (root / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def garden(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("garden") / "garden")


def test_a_folder_of_images_lists_its_photos_and_their_classes(garden):
    assert is_image_folder(garden) and not is_image_folder(garden / "daisy" / "daisy-0.jpg")
    files = folder_files(garden)
    assert len(files) == 36 and all(f.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp") for f in files)
    images, names = images_and_names(garden, "train", 32)
    assert images.shape == (36, 3, 32, 32) and names[0] == "daisy/daisy-0.jpg"
    assert flower_classes(garden, names) == [1] * 12 + [2] * 12 + [3] * 12
    assert flower_classes(garden, ["tulip/tulip-3.png", "loose.jpg"]) == [3, 0]
    assert (garden / ".vae-cache").is_dir() and not is_image_folder(garden / ".vae-cache")  # hidden: not a class


def test_center_crop_keeps_the_middle_square_and_squash_keeps_everything(tmp_path):
    wide = np.zeros((40, 120, 3), dtype=np.uint8)
    wide[:, :40] = 255  # white on the left third, black elsewhere
    Image.fromarray(wide).save(tmp_path / "wide.png")
    squashed = decode_rgb(tmp_path / "wide.png", 8)
    cropped = decode_rgb(tmp_path / "wide.png", 8, resize="center-crop")
    assert squashed[:, 0].min() == 255 and squashed[:, -1].max() == 0  # the white third is still there
    assert cropped.max() == 0  # the centred 40x40 square is all black
    assert torch.equal(load_image(tmp_path / "wide.png", 8, resize="center-crop"),
                       torch.from_numpy(cropped).permute(2, 0, 1))


def test_train_evaluate_and_make_variations_on_a_folder_of_photos(garden, tmp_path, capsys, monkeypatch):
    common = ["--data-dir", garden, "--log-dir", tmp_path, "--epochs", 2, *TINY]
    code = __import__("vae_training").main([str(a) for a in [*common, "--run-name", "none"]])
    err = capsys.readouterr().err
    assert code == 2 and "is a folder of images" in err and "--holdout 0.1" in err
    inside = [str(a) for a in [*common, "--holdout", 0.25, "--log-dir", garden / "runs"]]
    assert __import__("vae_training").main(inside) == 2  # a run inside the photos would become photos itself
    assert "is inside" in capsys.readouterr().err and not (garden / "runs").exists()
    train(*common, "--run-name", "crop", "--holdout", 0.25, "--resize", "center-crop")
    checkpoint = tmp_path / "crop" / "checkpoint.pt"
    # The run ends with where it is, its held-out numbers and the commands to run next, which work as printed.
    summary = capsys.readouterr().out.split("done: ")[1].splitlines()
    assert "run folder" in summary[0] and summary[1].startswith("held-out: -ELBO")
    commands = [shlex.split(line) for line in summary if line.startswith("  python vae_inference.py")]
    assert [c[2] for c in commands] == ["sample", "evaluate"] and "--holdout-from-checkpoint" in commands[1]
    monkeypatch.chdir(tmp_path)
    for command in commands:
        assert inference_main(command[2:]) == 0, capsys.readouterr().err
    assert "held out by --holdout 0.25" in capsys.readouterr().out and (tmp_path / "outputs" / "samples.png").is_file()
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["config"]["resize"] == "center-crop" and saved["eval"]["num_images"] == 9  # a quarter of 36
    out = tmp_path / "eval.json"
    assert inference_main(["evaluate", "--checkpoint", str(checkpoint), "--holdout-from-checkpoint",
                           "--iw-samples", "2", "--json", str(out)]) == 0
    evaluated = json.loads(out.read_text())
    assert evaluated["num_images"] == 9 and evaluated["psnr_db"] > 0
    photo = folder_files(garden)[15]  # a rose
    capsys.readouterr()
    assert inference_main(["variations", "--checkpoint", str(checkpoint), "--images", str(photo), "--num", "2",
                           "--out", str(tmp_path / "v.png")]) == 0, capsys.readouterr().err
    assert inference_main(["projector", "--checkpoint", str(checkpoint), "--holdout-from-checkpoint",
                           "--log-dir", str(tmp_path / "projector")]) == 0
    metadata = next((tmp_path / "projector").rglob("metadata.tsv")).read_text().split()
    assert len(metadata) == 9 and set(metadata) <= {"daisy", "rose", "tulip"}  # the held-out photos' sub-folders
    assert len(set(metadata)) > 1
    # The run's own projector, written at its end, names them the same way.
    in_run = next((tmp_path / "crop").rglob("metadata.tsv")).read_text().split()
    assert sorted(in_run) == sorted(metadata)


def test_a_flowers102_root_given_one_level_too_deep_is_still_flowers102(flowers_root):
    """--data-dir .../flowers-102 (the folder that holds setid.mat and jpg/) reads its splits and labels; it is not
    taken for a folder of images with one class, jpg/."""
    inner = flowers_root / "flowers-102"
    assert not is_image_folder(inner)
    images, names = images_and_names(inner, "val", 16)
    same_images, same_names = images_and_names(flowers_root, "val", 16)
    assert names == same_names and torch.equal(images, same_images) and len(names) == 8


def test_a_data_dir_that_does_not_exist_is_named_and_never_created(tmp_path, capsys):
    import vae_training

    missing = tmp_path / "flowrs"
    code = vae_training.main(["--data-dir", str(missing), "--log-dir", str(tmp_path / "runs"), *TINY])
    err = capsys.readouterr().err
    assert code == 2 and f"the data folder {missing} does not exist" in err and "Traceback" not in err, err
    assert not missing.exists(), "a mistyped path became a folder, with a download on its way into it"


def test_images_may_name_a_folder_of_photos(tmp_path, capsys):
    import shutil

    photos = tmp_path / "my photos"
    (photos / "roses").mkdir(parents=True)
    for i, source in enumerate(real_flower_files(3)):
        shutil.copy(source, (photos / "roses" if i else photos) / f"flower-{i}.jpg")
    (photos / "notes.txt").write_text("not an image")
    out = tmp_path / "reconstructions.png"
    assert inference_main(["reconstruct", "--images", str(photos), "--out", str(out), "--threads", "1"]) == 0
    assert "3 image file(s)" in capsys.readouterr().out and out.is_file()
    out_dir = tmp_path / "varied"
    assert inference_main(["variations", "--images", str(photos), "--num", "2", "--out-dir", str(out_dir),
                           "--threads", "1"]) == 0
    assert sorted(path.name for path in out_dir.iterdir()) == [f"flower-{i}-{k}.png" for i in range(3) for k in (1, 2)]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert inference_main(["reconstruct", "--images", str(empty), "--out", str(out)]) == 2
    assert f"--images {empty} is a folder with no images" in capsys.readouterr().err


def test_a_moved_photo_or_a_renamed_class_folder_gives_the_new_classes(tmp_path):
    """The image cache's key covers each photo's path inside the data set, not only its file name: the classes
    read from the names follow a photo moved to another class folder, and a renamed folder."""
    garden = make_image_folder(tmp_path / "garden", classes=("daisy", "rose"), per_class=3)

    def classes():
        """{folder/stem: class} of the data set as loaded through its cache."""
        _, names = images_and_names(garden, "train", 8)
        return {name.rsplit(".", 1)[0]: label for name, label in zip(names, flower_classes(garden, names))}

    first = next((garden / "rose").glob("rose-0.*"))
    assert classes()["rose/rose-0"] == 2
    first.rename(garden / "daisy" / first.name)  # a rename keeps the file's size and modification time
    moved = classes()
    assert moved["daisy/rose-0"] == 1 and "rose/rose-0" not in moved
    (garden / "daisy").rename(garden / "tulip")  # now after rose: rose is class 1, tulip 2
    renamed = classes()
    assert renamed["tulip/rose-0"] == 2 and renamed["rose/rose-1"] == 1


def test_photos_deeper_down_belong_to_their_top_level_class(tmp_path):
    """roses/2024/a.jpg is a rose; a folder whose photos all lie two levels down is a folder of photos, never a
    missing Flowers102 root to download into."""
    garden = make_image_folder(tmp_path / "garden", classes=("daisy", "rose"), per_class=3)
    deeper = garden / "rose" / "2024"
    deeper.mkdir()
    next((garden / "daisy").glob("daisy-1.*")).rename(deeper / "was-a-daisy.png")
    hidden = garden / "rose" / ".thumbnails"
    hidden.mkdir()
    (hidden / "thumb.png").write_bytes((deeper / "was-a-daisy.png").read_bytes())
    names = [file.relative_to(garden).as_posix() for file in folder_files(garden)]
    assert "rose/2024/was-a-daisy.png" in names and len(names) == 6 and not any(".thumbnails" in n for n in names)
    assert flower_classes(garden, ["rose/2024/was-a-daisy.png", "daisy/x.jpg"]) == [2, 1]
    nested = tmp_path / "by-year"
    (nested / "2024").mkdir(parents=True)
    (garden / "rose").rename(nested / "2024" / "rose")
    assert is_image_folder(nested) and len(folder_files(nested)) == 4
