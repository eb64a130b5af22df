"""Raw-source listing: hidden files ignored, stray files rejected by reason, odd names and key collisions."""

from __future__ import annotations

import os
import unicodedata

import pytest

from shard_fixtures import _jpeg, _photo, video_cfg
from ulcore.data import imagenet, kinetics, listing
from ulcore.data.shards import safe_key

CLASSES = [("n00000001", "first"), ("n00000002", "second")]


def _image(path, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_jpeg(_photo(8, 8, seed)))


def _reasons(listed, root) -> dict[str, str]:
    return {listing.relative(r["path"], str(root)): r["reason"] for r in listed.rejects}


def test_safe_key_is_stable_across_unicode_forms_and_keeps_names_apart():
    assert safe_key("n01440764_10026") == "n01440764_10026"
    assert safe_key(unicodedata.normalize("NFD", "café")) == safe_key("café") == "caf_u00e9"
    assert safe_key("cafè") != safe_key("café")
    assert safe_key("猫 1") == "_u732b_1" and safe_key("a.b c") == "a_b_c"


def test_imagenet_mac_copy_is_listed_with_its_metadata_ignored(tmp_path):
    """The reported crash: Finder's `._x.JPEG` / `.DS_Store` gave an empty stem and stopped the whole stage."""
    train = tmp_path / "train"
    _image(train / "n00000001" / "a.JPEG")
    _image(train / "n00000002" / "b.JPEG")
    for hidden in ("n00000001/._a.JPEG", ".DS_Store", "n00000002/.DS_Store", "__MACOSX/n00000001/._a.JPEG",
                   "n00000002/Thumbs.db", "n00000002/Desktop.ini", ".git/objects/ab"):
        (train / hidden).parent.mkdir(parents=True, exist_ok=True)
        (train / hidden).write_bytes(b"\0\5\26\7")
    listed = imagenet.list_split(str(tmp_path), "train", CLASSES)
    assert [it.key for it in listed.items] == ["a", "b"] and listed.rejects == [] and listed.ignored == 7
    assert [w for w, _ in imagenet.read_classes(str(tmp_path))] == ["n00000001", "n00000002"]  # no __MACOSX class


def test_imagenet_odd_names_extensions_and_collisions(tmp_path):
    a, b = tmp_path / "train" / "n00000001", tmp_path / "train" / "n00000002"
    names = ["x.JPEG", "x.jpeg", "y.JPG", "z.jpg", "with space.JPEG", "with_space.png", "two.dots.JPEG",
             unicodedata.normalize("NFC", "café.JPEG"), unicodedata.normalize("NFD", "café.JPEG"), "猫.webp"]
    for i, name in enumerate(names):
        _image(a / name, i)
    _image(b / "y.jpeg", 20)  # the same key in another class folder
    (b / "notes.txt").write_text("x")
    (b / "README").write_text("x")
    (b / "download.JPEG.part").write_bytes(b"\xff\xd8")
    listed = imagenet.list_split(str(tmp_path), "train", CLASSES)
    keys = [it.key for it in listed.items]
    assert keys == ["caf_u00e9", "two_dots", "with_space", "x", "y", "z", "_u732b"]  # URI order
    assert len(set(keys)) == len(keys)
    by_name = {os.path.basename(r["path"]): r for r in listed.rejects}
    assert {n: r["reason"] for n, r in by_name.items()} == {
        "x.jpeg": "duplicate_key", "with_space.png": "duplicate_key", "y.jpeg": "duplicate_key",
        # both Unicode forms of one name: NFD ('e' + U+0301) sorts before NFC ('é' = U+00E9) and keeps the key
        unicodedata.normalize("NFC", "café.JPEG"): "duplicate_key",
        "notes.txt": "unknown_extension", "README": "unknown_extension", "download.JPEG.part": "unknown_extension"}
    # a collision names both files: the later one is the reject, the first (URI order) keeps the key
    assert str(a / "x.JPEG") in by_name["x.jpeg"]["detail"] and by_name["x.jpeg"]["path"] == str(a / "x.jpeg")
    assert str(a / "with space.JPEG") in by_name["with_space.png"]["detail"]
    assert str(a / "y.JPG") in by_name["y.jpeg"]["detail"]
    assert str(a / unicodedata.normalize("NFD", "café.JPEG")) in by_name[unicodedata.normalize("NFC", "café.JPEG")][
        "detail"]
    again = imagenet.list_split(str(tmp_path), "train", CLASSES)
    assert again == listed  # deterministic


def test_imagenet_local_only_defects(tmp_path):
    a = tmp_path / "train" / "n00000001"
    _image(a / "good.JPEG")
    os.symlink(tmp_path / "gone.JPEG", a / "dangling.JPEG")
    os.symlink(a / "good.JPEG", a / "alias.JPEG")  # a link to a file is that file
    os.mkfifo(a / "pipe.JPEG")  # reading it would block the shard task forever
    _image(a / "sub" / "deep.JPEG")  # a folder where class-folder files are expected
    (a / "empty.JPEG").mkdir()  # a folder named like an image, holding nothing: nothing to list
    elsewhere = tmp_path / "disk2" / "n00000002"
    _image(elsewhere / "linked.JPEG")
    os.symlink(elsewhere, tmp_path / "train" / "n00000002")  # a class folder on another disk is followed
    os.symlink(tmp_path / "train", elsewhere / "loop")  # ... but not a link back to a parent
    listed = imagenet.list_split(str(tmp_path), "train", CLASSES)
    assert [it.key for it in listed.items] == ["alias", "good", "linked"]
    assert _reasons(listed, tmp_path) == {
        "train/n00000001/dangling.JPEG": "broken_link", "train/n00000001/pipe.JPEG": "not_a_file",
        "train/n00000001/sub/deep.JPEG": "nested", "train/n00000002/loop": "symlink_loop"}
    detail = {r["reason"]: r["detail"] for r in listed.rejects}
    assert "gone.JPEG" in detail["broken_link"] and "n00000001/" in detail["nested"]


def test_unlistable_folder_is_a_reject(tmp_path, monkeypatch):
    """A folder that cannot be read (permissions; root reads everything, so os.scandir is made to fail)."""
    _image(tmp_path / "train" / "n00000001" / "a.JPEG")
    _image(tmp_path / "train" / "n00000002" / "b.JPEG")
    locked = str(tmp_path / "train" / "n00000002")
    real_scandir = os.scandir

    def scandir(path):
        if os.fspath(path) == locked:
            raise PermissionError(13, "Permission denied", path)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    listed = imagenet.list_split(str(tmp_path), "train", CLASSES)
    assert [it.key for it in listed.items] == ["a"]
    assert listed.rejects == [{"path": locked, "reason": "unreadable",
                               "detail": f"cannot list folder {locked}: Permission denied"}]


def test_capped_inputs_are_counted(tmp_path):
    for i in range(3):
        _image(tmp_path / "train" / "n00000001" / f"{i}.JPEG", i)
    listed = imagenet.list_split(str(tmp_path), "train", CLASSES, max_per_class=2)
    assert len(listed.items) == 2 and listed.capped == 1


def _kinetics_tree(root, rows: list[str], files: list[str]) -> None:
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "train.csv").write_text("label,youtube_id,time_start,time_end,split\n"
                                                    + "".join(r + ",train\n" for r in rows))
    for name in files:
        (root / "videos" / "train" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "videos" / "train" / name).write_bytes(b"clip")


def test_kinetics_every_file_and_row_is_accounted(tmp_path):
    rows = ["cat,aaa,10,20", "dog,a.b,10,20", "dog,a_b,10,20", "cat,aaa,10,20", "cat,gone,0,10", "bird,bbb,0,10",
            ",ccc,0,10", "cat,bad,x,10", "cat,ddd,0,10", "cat,eee,0,10", 'dog,"id,1",0,10']
    files = ["aaa_000010_000020.mp4", "a.b_000010_000020.MP4", "a_b_000010_000020.webm", "bbb_000000_000010.mp4",
             "ccc_000000_000010.mp4", "ddd_000000_000010.webm", "ddd_000000_000010.mp4", "dog/eee_000000_000010.mkv",
             "id,1_000000_000010.mp4", "stray_000000_000010.mp4", "fff_000000_000010.mp4.part", ".DS_Store",
             "._aaa_000010_000020.mp4", "__MACOSX/._ddd_000000_000010.mp4"]
    _kinetics_tree(tmp_path, rows, files)
    cfg = video_cfg(str(tmp_path), str(tmp_path / "out"), "data.splits=[train]", "video.annotations={train: train.csv}",
                    "video.video_dirs={train: train}")
    listed = kinetics.list_split(str(tmp_path), cfg, "train", ["cat", "dog"])
    keys = [it.key for it in listed.items]
    assert keys == ["a_b_000010_000020", "aaa_000010_000020", "ddd_000000_000010", "eee_000000_000010",
                    "id_1_000000_000010"]
    assert next(it for it in listed.items if it.key.startswith("ddd")).uri.endswith(".mp4")  # container preference
    assert next(it for it in listed.items if it.key.startswith("a_b")).uri.endswith("a.b_000010_000020.MP4")
    got = sorted((os.path.basename(r["path"]), r["reason"]) for r in listed.rejects)
    ann = str(tmp_path / "annotations" / "train.csv")
    assert got == sorted([
        ("a_b_000010_000020.webm", "duplicate_key"),  # 'a.b' sorts first and keeps the key a_b_...
        ("train.csv:5", "duplicate_key"),  # the repeated row for aaa
        ("gone_000000_000010.mp4", "missing"), ("bbb_000000_000010.mp4", "unknown_class"),
        ("ccc_000000_000010.mp4", "unlabelled"), ("train.csv:9", "bad_row"),
        ("ddd_000000_000010.webm", "duplicate_key"),  # the same clip in a less preferred container
        ("stray_000000_000010.mp4", "unannotated"), ("fff_000000_000010.mp4.part", "unknown_extension")])
    by_path = {r["path"]: r for r in listed.rejects}
    assert str(tmp_path / "videos/train/a.b_000010_000020.MP4") in by_path[
        str(tmp_path / "videos/train/a_b_000010_000020.webm")]["detail"]
    assert by_path[f"{ann}:5"]["detail"] == "row repeats aaa_000010_000020"
    assert listed.ignored == 3
    on_disk = sum(len(f) for _, _, f in os.walk(tmp_path / "videos" / "train"))
    file_rejects = [r for r in listed.rejects if os.path.lexists(r["path"])]
    assert len(listed.items) + len(file_rejects) + listed.ignored == on_disk == len(files)


@pytest.mark.slow
def test_scan_lists_s3_like_local(s3_bucket, tmp_path):
    from shard_fixtures import upload_tree

    _image(tmp_path / "train" / "n00000001" / "a.JPEG")
    for name in ("n00000001/._a.JPEG", "__MACOSX/x", "n00000001/sub/b.JPEG", "n00000001/c.txt"):
        (tmp_path / "train" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "train" / name).write_bytes(b"x")
    upload_tree(tmp_path, s3_bucket + "/raw")
    local = imagenet.list_split(str(tmp_path), "train", CLASSES)
    remote = imagenet.list_split(s3_bucket + "/raw", "train", CLASSES)
    assert [it.key for it in remote.items] == [it.key for it in local.items] == ["a"]
    assert remote.ignored == local.ignored == 2
    assert [(listing.relative(r["path"], s3_bucket + "/raw"), r["reason"]) for r in remote.rejects] == [
        ("train/n00000001/c.txt", "unknown_extension"), ("train/n00000001/sub/b.JPEG", "nested")]
    assert [r["reason"] for r in local.rejects] == ["unknown_extension", "nested"]


def test_split_with_only_hidden_files_is_a_config_error(tmp_path):
    (tmp_path / "train" / "n00000001").mkdir(parents=True)
    (tmp_path / "train" / "n00000001" / ".DS_Store").write_bytes(b"x")
    with pytest.raises(ValueError, match="no files for split 'train'.*1 hidden files ignored"):
        imagenet.list_split(str(tmp_path), "train", CLASSES)
