"""train/sources.py: which source a config gets and why, the shipped demo photographs, the clean list picked up."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import tiny_config
from PIL import Image

from repae.train.sources import DEMO_PHOTOS, build_source, choose_source, copy_demo_photos, default_clean_list

CPU, GPU = torch.device("cpu"), torch.device("cuda")


def test_auto_picks_h5_for_an_h5_root_and_folder_on_cpu(monkeypatch):
    import repae.train.sources as sources

    assert choose_source("auto", "/data/images.h5", CPU)[0] == "h5"
    name, why = choose_source("auto", "/data/imagenet/train", CPU)
    assert name == "folder" and "no GPU" in why
    monkeypatch.setattr(sources, "dali_available", lambda: False)
    name, why = choose_source("auto", "/data/imagenet/train", GPU)
    assert name == "folder" and "repae[dali]" in why
    monkeypatch.setattr(sources, "dali_available", lambda: True)
    assert choose_source("auto", "/data/imagenet/train", GPU)[0] == "dali"
    assert choose_source("folder", "/data/imagenet/train", GPU) == ("folder", "data.source=folder")


def test_demo_photos_ship_as_real_jpegs_in_four_classes():
    classes = sorted(d for d in os.listdir(DEMO_PHOTOS) if os.path.isdir(os.path.join(DEMO_PHOTOS, d)))
    assert len(classes) == 4 and os.path.isfile(os.path.join(DEMO_PHOTOS, "LICENSE.md"))
    files = [os.path.join(DEMO_PHOTOS, c, f) for c in classes for f in os.listdir(os.path.join(DEMO_PHOTOS, c))]
    assert len(files) == 48
    modes = set()
    for f in files:
        with Image.open(f) as img:
            assert img.format == "JPEG" and min(img.size) >= 64
            modes.add(img.mode)
    assert modes == {"RGB", "L"}  # one greyscale photograph goes through the RGB conversion


def test_demo_source_reads_the_photos_copied_into_the_run(tmp_path):
    cfg = tiny_config(tmp_path / "run")
    source, line = build_source(cfg, rank=0, world=1, device=CPU, run_dir=str(tmp_path / "run"))
    assert "real photographs" in line and source.num_images == 48 and source.num_classes == 4
    images, labels = source.next_batch()
    assert images.dtype == torch.uint8 and list(images.shape) == [4, 3, 64, 64] and labels.dtype == torch.int64
    assert source.last_indices.shape == (4,)
    assert copy_demo_photos(str(tmp_path / "run" / "demo_photos")) == str(tmp_path / "run" / "demo_photos")


def test_the_clean_list_beside_the_tree_is_used(tmp_path):
    root = tmp_path / "tree"
    copy_demo_photos(str(root))
    clean = default_clean_list(str(root))
    os.makedirs(os.path.dirname(clean))
    kept = sorted(f"class_01_cat/{f}" for f in os.listdir(root / "class_01_cat"))[:6]
    with open(clean, "w") as f:
        f.write("# relpath<TAB>label\n" + "".join(f"{p}\t1\n" for p in kept))
    cfg = tiny_config(tmp_path / "run", "data.source=folder", f"data.root={root}")
    source, line = build_source(cfg, rank=0, world=1, device=CPU, run_dir=str(tmp_path / "run"))
    assert clean in line and source.num_images == 6
    with pytest.raises(ValueError, match="sit.num_classes"):  # label 1 of a 1-class model
        build_source(tiny_config(tmp_path / "run", "data.source=folder", f"data.root={root}", "sit.num_classes=1"),
                     rank=0, world=1, device=CPU, run_dir=str(tmp_path / "run"))


def test_a_bad_file_list_line_names_the_file_and_line(tmp_path):
    root = tmp_path / "tree"
    copy_demo_photos(str(root))
    bad = tmp_path / "list.txt"
    bad.write_text("class_01_cat/chelsea_00.jpg\t1\nclass_01_cat/chelsea_01.jpg one\n")
    cfg = tiny_config(tmp_path / "run", "data.source=folder", f"data.root={root}", f"data.file_list={bad}")
    with pytest.raises(ValueError, match=r"list\.txt:2: expected 'relpath<TAB>label'"):
        build_source(cfg, rank=0, world=1, device=CPU, run_dir=str(tmp_path / "run"))
