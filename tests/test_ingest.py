"""Ingest: real JPEGs from the cats/dogs set, real Parquet, bad files made here."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import shutil
import zlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from runner.data import ingest as ingest_mod
from runner.data.ingest import ingest, load_manifest, shard_paths, summary
from runner.errors import RunnerError

DATA = Path("/work/shared/datasets/cats_dogs")
SIZE = 16  # small base size keeps the bad-file tests fast

pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason="cats_dogs data missing")


# ------------------------------------------------------------------ helpers


def make_root(tmp_path: Path, per_class: int = 2, name: str = "data",
              classes: dict | None = None) -> Path:
    """A data root with ``per_class`` real JPEGs per class and split.

    ``classes`` maps the class folder name to create -> source class folder.
    """
    classes = classes or {"cats": "cats", "dogs": "dogs"}
    root = tmp_path / name
    for split in ("training_set", "test_set"):
        for dst_name, src_name in classes.items():
            dst = root / split / dst_name
            dst.mkdir(parents=True)
            for i in range(1, per_class + 1):
                stem = f"{src_name[:-1]}.{_first(split) + i}"
                shutil.copy(DATA / split / src_name / f"{stem}.jpg", dst)
    return root


def _first(split: str) -> int:
    return 0 if split == "training_set" else 4000  # test_set numbering starts at 4001


def run(root: Path, out: Path, **kw) -> dict:
    kw.setdefault("base_size", SIZE)
    kw.setdefault("workers", 1)
    return ingest(str(root), str(out), **kw)


def read_rows(out: Path, manifest: dict) -> dict[str, dict]:
    rows = {}
    for paths in shard_paths(str(out), manifest).values():
        for path in paths:
            for row in pq.read_table(path).to_pylist():
                rows[row["path"]] = row
    return rows


def pixels(row: dict, size: int = SIZE) -> np.ndarray:
    return np.frombuffer(row["image"], np.uint8).reshape(size, size, 3)


def skips(manifest: dict) -> dict[str, str]:
    return {s["path"]: s["reason"] for s in manifest["skipped"]}


def tree_state(folder: Path) -> dict[str, tuple]:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in folder.rglob("*")}


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def ingest_one(tmp_path: Path, name: str, data: bytes, **kw):
    """Ingest a small root plus one extra file in training_set/cats."""
    root = make_root(tmp_path)
    (root / "training_set" / "cats" / name).write_bytes(data)
    manifest = run(root, tmp_path / "out", **kw)
    rel = f"training_set/cats/{name}"
    return manifest, read_rows(tmp_path / "out", manifest).get(rel), rel


# --------------------------------------------------------- the happy path


def test_real_subset_round_trip(tmp_path):
    root = make_root(tmp_path, per_class=20)
    out = tmp_path / "out"
    manifest = run(root, out, base_size=32, shard_rows=15, workers=2)

    assert manifest["classes"] == ["cats", "dogs"]
    assert manifest["counts"] == {"train": {"cats": 20, "dogs": 20},
                                  "test": {"cats": 20, "dogs": 20}}
    assert manifest["skipped"] == [] and manifest["reused"] is False
    assert [len(v) for v in manifest["shards"].values()] == [3, 3]
    assert manifest["source"] == str(root.resolve())
    rows = read_rows(out, manifest)
    assert len(rows) == 80
    for rel, row in rows.items():
        assert pixels(row, 32).shape == (32, 32, 3)
        assert row["label"] == (0 if "/cats/" in rel else 1)
        assert (row["height"], row["width"]) == (200, 200)
        assert row["fold"] == zlib.crc32(rel.encode()) % 100
    assert load_manifest(str(out))["fingerprint"] == manifest["fingerprint"]


def test_pixels_match_a_plain_pillow_resize(tmp_path):
    root = make_root(tmp_path, per_class=1)
    manifest = run(root, tmp_path / "out", base_size=64)
    row = read_rows(tmp_path / "out", manifest)["training_set/dogs/dog.1.jpg"]
    src = Image.open(root / "training_set/dogs/dog.1.jpg").convert("RGB")
    expected = np.asarray(src.resize((64, 64), Image.Resampling.BILINEAR))
    diff = np.abs(pixels(row, 64).astype(int) - expected.astype(int))
    assert diff.mean() < 4  # DCT-scaled decode differs only slightly


def test_shards_mix_classes(tmp_path):
    root = make_root(tmp_path, per_class=10)
    manifest = run(root, tmp_path / "out", shard_rows=10)
    first = pq.read_table(shard_paths(str(tmp_path / "out"), manifest)["train"][0])
    assert set(first.column("label").to_pylist()) == {0, 1}


def test_second_call_is_a_no_op(tmp_path, caplog):
    root = make_root(tmp_path)
    out = tmp_path / "out"
    first = run(root, out)
    before = tree_state(out)

    with caplog.at_level(logging.INFO, logger="runner.data.ingest"):
        again = run(root, "file://" + str(out))
    assert again["reused"] is True
    assert again["fingerprint"] == first["fingerprint"]
    assert tree_state(out) == before
    assert "reusing" in caplog.text
    assert summary(again).endswith("reused")


def test_changed_file_or_setting_reingests(tmp_path):
    root = make_root(tmp_path)
    out = tmp_path / "out"
    first = run(root, out)
    old_version = first["shards"]["train"][0].split("/")[0]

    cat = root / "training_set/cats/cat.1.jpg"
    cat.write_bytes((root / "training_set/dogs/dog.1.jpg").read_bytes())
    second = run(root, out)
    assert second["reused"] is False
    assert second["fingerprint"] != first["fingerprint"]
    assert not (out / old_version).exists()
    assert load_manifest(str(out))["fingerprint"] == second["fingerprint"]

    assert run(root, out, base_size=SIZE + 8)["fingerprint"] != second["fingerprint"]


def test_force_reingests_into_a_new_version(tmp_path):
    root = make_root(tmp_path)
    out = tmp_path / "out"
    first = run(root, out)
    forced = run(root, out, force=True)
    assert forced["reused"] is False
    assert forced["fingerprint"] == first["fingerprint"]
    assert forced["shards"] != first["shards"]
    assert [p.name for p in out.iterdir() if p.is_dir()] == [
        forced["shards"]["train"][0].split("/")[0]]


def test_missing_shard_is_noticed(tmp_path):
    root = make_root(tmp_path)
    out = tmp_path / "out"
    first = run(root, out)
    (out / first["shards"]["test"][0]).unlink()
    with pytest.raises(RunnerError, match="missing"):
        load_manifest(str(out))
    assert run(root, out)["reused"] is False
    load_manifest(str(out))


def test_load_manifest_without_ingest(tmp_path):
    with pytest.raises(RunnerError, match="no manifest"):
        load_manifest(str(tmp_path))
    (tmp_path / "manifest.json").write_text(json.dumps({"version": 1}))
    with pytest.raises(RunnerError, match="incomplete"):
        load_manifest(str(tmp_path))


def test_summary_line(tmp_path):
    manifest, _, _ = ingest_one(tmp_path, "empty.jpg", b"")
    line = summary(manifest)
    assert "train: cats 2, dogs 2" in line and "test: cats 2, dogs 2" in line
    assert "skipped 1 (empty 1)" in line and line.endswith("ingested")
    assert "\n" not in line


# ------------------------------------------------------- bad and odd files


def _real_jpeg() -> bytes:
    return (DATA / "training_set/cats/cat.100.jpg").read_bytes()


@pytest.mark.parametrize("name, data, reason", [
    ("zero.jpg", b"", "empty"),
    ("half.jpg", _real_jpeg()[: len(_real_jpeg()) // 2], "truncated"),
    ("header-only.jpg", _real_jpeg()[:400], "truncated"),
    ("noise.jpg", bytes(np.random.default_rng(0).integers(0, 256, 5000, np.uint8)),
     "not_an_image"),
    ("notes.png", b"these are my notes, not a picture\n" * 20, "not_an_image"),
    ("float.tif", encode(Image.new("F", (20, 20), 0.5), "TIFF"), "unsupported_mode"),
])
def test_bad_file_is_skipped(tmp_path, name, data, reason):
    manifest, row, rel = ingest_one(tmp_path, name, data)
    assert row is None
    assert skips(manifest) == {rel: reason}
    assert manifest["counts"]["train"]["cats"] == 2


def test_corrupt_png_is_skipped(tmp_path):
    png = bytearray(encode(Image.new("RGB", (50, 50), (1, 2, 3)), "PNG"))
    png[png.find(b"IDAT") + 6] ^= 0xFF  # break the zlib stream
    manifest, row, rel = ingest_one(tmp_path, "broken.png", bytes(png))
    assert row is None and skips(manifest) == {rel: "corrupt"}


def _palette_with_transparency() -> bytes:
    img = Image.new("P", (20, 20), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    img.paste(1, (10, 0, 20, 20))  # right half red, left half transparent
    return encode(img, "PNG", transparency=0)


def _sixteen_bit() -> bytes:
    img = Image.fromarray(np.full((20, 20), 40000, np.uint16))
    assert img.mode == "I;16"
    return encode(img, "PNG")


RED, GREEN, BLUE, WHITE = (200, 30, 30), (10, 200, 10), (20, 40, 220), (255, 255, 255)
SOLID = {
    "cmyk.jpg": (encode(Image.new("RGB", (40, 40), RED).convert("CMYK"), "JPEG",
                        quality=95), RED),
    "grey.jpg": (encode(Image.new("L", (40, 40), 120), "JPEG", quality=95),
                 (120, 120, 120)),
    "rgba.png": (encode(Image.new("RGBA", (20, 20), (0, 0, 0, 128)), "PNG"),
                 (127, 127, 127)),  # half-transparent black over white
    "sixteen.png": (_sixteen_bit(), (156, 156, 156)),  # 40000 / 65535 * 255
    "png-named.jpg": (encode(Image.new("RGB", (20, 20), GREEN), "PNG"), GREEN),
    "picture.bmp": (encode(Image.new("RGB", (20, 20), BLUE), "BMP"), BLUE),
    "picture.tiff": (encode(Image.new("RGB", (20, 20), BLUE), "TIFF"), BLUE),
    "picture.gif": (encode(Image.new("RGB", (20, 20), BLUE), "GIF"), BLUE),
    "one-bit.png": (encode(Image.new("1", (20, 20), 1), "PNG"), WHITE),
}


@pytest.mark.parametrize("name", sorted(SOLID))
def test_odd_formats_are_kept_as_rgb(tmp_path, name):
    data, colour = SOLID[name]
    manifest, row, rel = ingest_one(tmp_path, name, data)
    assert manifest["skipped"] == []
    assert manifest["counts"]["train"]["cats"] == 3
    got = pixels(row).reshape(-1, 3).mean(axis=0)
    assert np.abs(got - colour).max() < 6, got


def test_palette_transparency_composites_on_white(tmp_path):
    _, row, _ = ingest_one(tmp_path, "palette.png", _palette_with_transparency())
    img = pixels(row)
    assert tuple(img[8, 2]) == WHITE
    assert tuple(img[8, 13]) == (255, 0, 0)


def test_exif_rotation_is_applied(tmp_path):
    # 200 wide x 100 tall, red square at the top left, the rest blue. Tag 6
    # means "rotate 90 degrees clockwise to view", so upright it is 100 x 200
    # with the red square at the top right.
    img = Image.new("RGB", (200, 100), BLUE)
    img.paste(RED, (0, 0, 50, 50))
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(img, "JPEG", quality=95, exif=exif)
    _, row, _ = ingest_one(tmp_path, "rotated.jpg", data)
    assert (row["height"], row["width"]) == (200, 100)
    upright = pixels(row).astype(int)
    assert np.abs(upright[1, 12] - RED).max() < 30
    assert np.abs(upright[1, 3] - BLUE).max() < 30
    assert np.abs(upright[12, 12] - BLUE).max() < 30


def test_oversized_image_is_refused_before_decoding(tmp_path):
    # The header says 1000x1000, but the pixel data is cut off: a decoder
    # would call it truncated, so "too_large" proves only the header was read.
    png = encode(Image.new("RGB", (1000, 1000), RED), "PNG")
    cut = png[: png.find(b"IDAT") + 8]
    manifest, row, rel = ingest_one(tmp_path, "huge.png", cut, max_pixels=100_000)
    assert row is None and skips(manifest) == {rel: "too_large"}
    assert "1000x1000" in manifest["skipped"][0]["detail"]


def test_decompression_bomb_error_is_caught(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # bomb above 2000 px
    data = encode(Image.new("RGB", (60, 60), RED), "PNG")
    (tmp_path / "bomb.png").write_bytes(data)
    outcome = ingest_mod.decode_image(str(tmp_path / "bomb.png"), SIZE)
    assert outcome.reason == "too_large"


def test_hidden_and_system_files_are_ignored(tmp_path):
    root = make_root(tmp_path)
    cats = root / "training_set" / "cats"
    for name in (".DS_Store", "Thumbs.db", "desktop.ini", "._cat.1.jpg"):
        (cats / name).write_bytes(b"\x00\x05\x16\x07 resource fork junk")
    (cats / ".thumbnails").mkdir()
    (root / "test_set" / ".DS_Store").write_bytes(b"junk")
    manifest = run(root, tmp_path / "out")
    assert set(skips(manifest).values()) == {"hidden"}
    assert len(manifest["skipped"]) == 6
    assert manifest["counts"]["train"]["cats"] == 2


def test_nested_folder_is_reported_not_descended(tmp_path):
    root = make_root(tmp_path)
    nested = root / "training_set" / "cats" / "more cats"
    nested.mkdir()
    shutil.copy(root / "training_set/cats/cat.1.jpg", nested / "cat.9.jpg")
    manifest = run(root, tmp_path / "out")
    assert skips(manifest) == {"training_set/cats/more cats": "nested_dir"}
    assert manifest["counts"]["train"]["cats"] == 2


def test_symlinks(tmp_path):
    root = make_root(tmp_path)
    cats = root / "training_set" / "cats"
    (cats / "outside.jpg").symlink_to(DATA / "training_set/cats/cat.50.jpg")
    (cats / "inside.jpg").symlink_to(root / "test_set/cats/cat.4001.jpg")
    (cats / "dangling.jpg").symlink_to(tmp_path / "nowhere.jpg")
    manifest = run(root, tmp_path / "out")
    assert skips(manifest) == {"training_set/cats/dangling.jpg": "broken_symlink"}
    assert manifest["counts"]["train"]["cats"] == 4
    rows = read_rows(tmp_path / "out", manifest)
    assert {f"training_set/cats/{name}.jpg" for name in ("inside", "outside")} \
        <= set(rows)


def linked_root(tmp_path: Path, per_class: int) -> Path:
    """The layout of make_root, every image a link to the real JPEG (``cp -s``)."""
    root = tmp_path / "links"
    for split in ("training_set", "test_set"):
        for cls in ("cats", "dogs"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(1, per_class + 1):
                name = f"{cls[:-1]}.{_first(split) + i}.jpg"
                (folder / name).symlink_to(DATA / split / cls / name)
    return root


def test_a_class_folder_of_links_ingests_like_one_of_copies(tmp_path):
    links, copies = linked_root(tmp_path, 3), make_root(tmp_path, per_class=3)
    linked = run(links, tmp_path / "out_links")
    copied = run(copies, tmp_path / "out_copies")
    assert linked["skipped"] == []
    assert linked["counts"] == copied["counts"] == {
        "train": {"cats": 3, "dogs": 3}, "test": {"cats": 3, "dogs": 3}}
    rows = read_rows(tmp_path / "out_links", linked)
    assert rows == read_rows(tmp_path / "out_copies", copied)  # same pixels
    assert ingest_mod.check_layout(str(links))["images"] == linked["counts"]


def test_a_link_to_a_folder_is_never_walked_even_when_it_loops(tmp_path):
    root = linked_root(tmp_path, 1)
    (root / "training_set" / "cats" / "loop").symlink_to(root / "training_set")
    manifest = run(root, tmp_path / "out")
    assert skips(manifest) == {"training_set/cats/loop": "nested_dir"}
    assert manifest["counts"]["train"] == {"cats": 1, "dogs": 1}


def test_a_class_folder_of_only_broken_links_says_why_it_has_no_images(tmp_path):
    root = make_root(tmp_path, per_class=1)
    dogs = root / "test_set" / "dogs"
    (dogs / "dog.4001.jpg").unlink()
    (dogs / "dog.4001.jpg").symlink_to(tmp_path / "moved" / "dog.4001.jpg")
    with pytest.raises(RunnerError, match=r"test_set/dogs has no image files "
                                          r"\(skipped: broken_symlink 1\)"):
        run(root, tmp_path / "out")


def test_names_with_spaces_and_non_ascii(tmp_path):
    root = make_root(tmp_path, name="my data ü",
                     classes={"chats noirs": "cats", "Hunde ü": "dogs"})
    odd = root / "training_set" / "chats noirs" / "café 猫 1.jpg"
    shutil.copy(root / "training_set/chats noirs/cat.1.jpg", odd)
    manifest = run(root, tmp_path / "sortie é")
    assert manifest["classes"] == ["Hunde ü", "chats noirs"]
    assert manifest["counts"]["train"] == {"Hunde ü": 2, "chats noirs": 3}
    rows = read_rows(tmp_path / "sortie é", manifest)
    assert rows["training_set/chats noirs/café 猫 1.jpg"]["label"] == 1
    assert run(root, tmp_path / "sortie é")["reused"] is True


# ------------------------------------------------------------- folder errors


@pytest.mark.parametrize("setup, words", [
    (lambda root: shutil.rmtree(root / "test_set"), ["no test_set folder"]),
    (lambda root: shutil.rmtree(root / "test_set" / "dogs") or
     (root / "test_set" / "dogs").mkdir(), ["test_set/dogs", "no image files"]),
    (lambda root: (shutil.rmtree(root / "training_set" / "dogs"),
                   shutil.rmtree(root / "test_set" / "dogs")),
     ["at least two class folders", "['cats']"]),
    (lambda root: (root / "test_set" / "dogs").rename(root / "test_set" / "dog"),
     ["differ", "training_set has ['cats', 'dogs']", "test_set has ['cats', 'dog']"]),
])
def test_folder_errors(tmp_path, setup, words):
    root = make_root(tmp_path, per_class=1)
    setup(root)
    with pytest.raises(RunnerError) as err:
        run(root, tmp_path / "out")
    for word in words:
        assert word in str(err.value)
    assert not (tmp_path / "out").exists()


def test_class_with_only_bad_files(tmp_path):
    root = make_root(tmp_path, per_class=1)
    out = tmp_path / "out"
    first = run(root, out)
    (root / "test_set/dogs/dog.4001.jpg").write_bytes(b"")
    words = r"test_set/dogs has no usable images \(skipped: empty 1\)"
    with pytest.raises(RunnerError, match=words):
        run(root, out)
    assert load_manifest(str(out))["fingerprint"] == first["fingerprint"]


def test_missing_or_file_root(tmp_path):
    with pytest.raises(RunnerError, match="no such folder"):
        run(tmp_path / "nope", tmp_path / "out")
    with pytest.raises(RunnerError, match="must be a local folder"):
        run("s3://bucket/cats_dogs", tmp_path / "out")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(RunnerError, match="not a folder"):
        run(tmp_path / "file.txt", tmp_path / "out")


def test_root_one_level_too_high_or_low(tmp_path):
    root = make_root(tmp_path, per_class=1)
    with pytest.raises(RunnerError, match=f"pass {root} instead"):
        run(tmp_path, tmp_path / "out")
    with pytest.raises(RunnerError, match=f"pass {root} instead"):
        run(root / "training_set", tmp_path / "out")
    with pytest.raises(RunnerError, match=f"pass {root} instead"):
        run(root / "training_set" / "cats", tmp_path / "out")


def test_bad_settings_and_output_inside_data(tmp_path):
    root = make_root(tmp_path, per_class=1)
    with pytest.raises(RunnerError, match="base_size"):
        run(root, tmp_path / "out", base_size=0)
    with pytest.raises(RunnerError, match="shard_rows"):
        run(root, tmp_path / "out", shard_rows="10")
    with pytest.raises(RunnerError, match="inside the data folder"):
        run(root, root / "training_set" / "shards")


# ------------------------------------------------------- interrupted ingest


def _digest_tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_interrupted_ingest_keeps_previous_shards(tmp_path, monkeypatch):
    root = make_root(tmp_path, per_class=3)
    out = tmp_path / "out"
    first = run(root, out, shard_rows=4)
    before = _digest_tree(out)
    (root / "training_set/cats/cat.1.jpg").unlink()  # a new fingerprint

    real_write = ingest_mod._write_shard
    calls = []

    def write_then_die(loc, rows):
        calls.append(loc)
        if len(calls) > 1:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C
        real_write(loc, rows)

    monkeypatch.setattr(ingest_mod, "_write_shard", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(root, out, shard_rows=4)

    assert _digest_tree(out) == before  # the half-written version was removed
    kept = load_manifest(str(out))
    assert kept["fingerprint"] == first["fingerprint"]
    assert len(read_rows(out, kept)) == 12


def test_crash_leftovers_are_cleaned_by_next_ingest(tmp_path, monkeypatch):
    root = make_root(tmp_path)
    out = tmp_path / "out"
    run(root, out)
    # A hard crash runs no cleanup: leave the unfinished version behind.
    monkeypatch.setattr(ingest_mod, "_delete_quietly", lambda loc: None)
    monkeypatch.setattr(ingest_mod, "_manifest",
                        lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError):
        run(root, out, force=True)
    assert len([p for p in out.iterdir() if p.is_dir()]) == 2
    monkeypatch.undo()

    latest = run(root, out, force=True)
    assert [p.name for p in out.iterdir() if p.is_dir()] == [
        latest["shards"]["train"][0].split("/")[0]]


def test_a_skip_reason_names_the_file_not_a_memory_buffer(tmp_path):
    manifest, _, rel = ingest_one(tmp_path, "notes.jpg", b"my notes\n" * 20)
    [skip] = manifest["skipped"]
    assert skip["path"] == rel and skip["reason"] == "not_an_image"
    assert "BytesIO" not in skip["detail"] and " at 0x" not in skip["detail"]
    assert skip["detail"].startswith("UnidentifiedImageError: ")


def test_runner_ingest_says_what_it_did_once(tmp_path):
    import subprocess
    import sys
    data = tmp_path / "images"
    for split in ("training_set", "test_set"):
        for cls in ("cats", "dogs"):
            (data / split / cls).mkdir(parents=True)
            for src in sorted((DATA / split / cls).iterdir())[:2]:
                shutil.copy(src, data / split / cls)
    command = [sys.executable, "-m", "runner.cli", "ingest", str(data), str(tmp_path / "out")]
    for how in ("ingested", "reused"):
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        said = done.stdout + done.stderr
        assert said.count("train: cats 2, dogs 2; test: cats 2, dogs 2") == 1, said
        assert f"72px; {how}" in said
