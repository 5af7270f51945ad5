"""Checkpoints: round trip, checksums, prefixes, and no code execution."""

import json

import pytest
import torch

from runner.errors import RunnerError
from runner.model import (
    ConvBlock,
    ConvLayer,
    ModelSpec,
    build_model,
    classifier_2,
    load_checkpoint,
    save_checkpoint,
)
from runner.model.checkpoint import _sha256


def small_spec():
    block = ConvBlock((ConvLayer(4),), pool="max", batchnorm=True)
    return ModelSpec("small", input_size=16, blocks=(block,), dense=(8,))


def saved(tmp_path, spec=None, meta=None):
    spec = spec or small_spec()
    sd = build_model(spec).state_dict()
    folder = save_checkpoint(tmp_path / "ckpt", spec, sd, meta or {"epoch": 3})
    return folder, spec, sd


def test_round_trip(tmp_path):
    folder, spec, sd = saved(tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == ["meta.json", "model.pt",
                                                          "spec.json"]
    spec2, sd2, meta = load_checkpoint(str(folder))
    assert spec2 == spec and meta["epoch"] == 3 and len(meta["sha256"]) == 64
    assert sd2.keys() == sd.keys()
    assert all(torch.equal(sd2[k], sd[k]) for k in sd)


def test_channels_last_weights_are_saved_plain(tmp_path):
    spec = classifier_2()
    model = build_model(spec).to(memory_format=torch.channels_last)
    save_checkpoint(tmp_path, spec, model.state_dict(), {})
    _, sd, _ = load_checkpoint(tmp_path)
    assert sd["blocks.1.convs.0.weight"].is_contiguous()


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupt_model_is_refused(tmp_path, damage):
    folder, _, _ = saved(tmp_path)
    data = bytearray((folder / "model.pt").read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
    else:
        data = data[: len(data) // 2]
    (folder / "model.pt").write_bytes(bytes(data))
    with pytest.raises(RunnerError, match="model.pt is corrupt or truncated"):
        load_checkpoint(folder)


def test_missing_files_are_named(tmp_path):
    folder, _, _ = saved(tmp_path)
    (folder / "spec.json").unlink()
    (folder / "meta.json").unlink()
    with pytest.raises(RunnerError, match="missing spec.json, meta.json"):
        load_checkpoint(folder)


class Payload:
    """Unpickling this runs code: it creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    folder, _, _ = saved(tmp_path)
    marker = tmp_path / "pwned"
    torch.save({"out.weight": Payload(marker)}, folder / "model.pt")
    # an attacker can fix the checksum too; weights_only must still refuse
    meta = json.loads((folder / "meta.json").read_text())
    meta["sha256"] = _sha256(folder / "model.pt")
    (folder / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(RunnerError, match="refused to load .*model.pt"):
        load_checkpoint(folder)
    assert not marker.exists()

    # proof that the payload is real: an unsafe load does run it
    torch.load(folder / "model.pt", weights_only=False)
    assert marker.exists()


def test_a_refused_pickle_is_named_and_torchs_unsafe_advice_dropped(tmp_path):
    folder, _, _ = saved(tmp_path)
    torch.save({"out.weight": Payload(tmp_path / "pwned")}, folder / "model.pt")
    (folder / "meta.json").write_text(json.dumps(
        {"sha256": _sha256(folder / "model.pt")}))
    with pytest.raises(RunnerError) as err:
        load_checkpoint(folder)
    text = str(err.value)
    assert text.startswith(f"refused to load {folder / 'model.pt'}: the file holds "
                           "pickled Python objects (it asks for exec), not plain "
                           "tensors")
    assert "refused for safety" in text and "\n" not in text
    assert "weights_only" not in text and "trust" not in text


def test_non_tensor_content_is_refused(tmp_path):
    folder, _, _ = saved(tmp_path)
    torch.save([torch.zeros(1)], folder / "model.pt")
    meta = {"sha256": _sha256(folder / "model.pt")}
    (folder / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(RunnerError, match="expected a dict of named tensors"):
        load_checkpoint(folder)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_wrapped_keys_load_the_same(tmp_path, prefix):
    spec = small_spec()
    sd = build_model(spec).state_dict()
    save_checkpoint(tmp_path, spec, {prefix + k: v for k, v in sd.items()}, {})
    _, loaded, _ = load_checkpoint(tmp_path)
    assert loaded.keys() == sd.keys()
    assert all(torch.equal(loaded[k], sd[k]) for k in sd)


def test_weights_that_do_not_fit_the_spec_are_named(tmp_path):
    folder, _, _ = saved(tmp_path)
    other = small_spec().to_dict()
    other["dense"] = [9]
    (folder / "spec.json").write_text(json.dumps(other))
    with pytest.raises(RunnerError, match=r"head.0.weight expected \(9, 256\)") as err:
        load_checkpoint(folder)
    assert str(err.value).startswith(f"checkpoint {folder}: weights do not fit "
                                     "spec 'small': ")


def test_bad_spec_json_names_the_file(tmp_path):
    folder, _, _ = saved(tmp_path)
    (folder / "spec.json").write_text(json.dumps({"name": "x", "colour": "red"}))
    with pytest.raises(RunnerError, match="spec.json.*colour"):
        load_checkpoint(folder)


def test_non_json_meta_is_refused(tmp_path):
    spec = small_spec()
    with pytest.raises(RunnerError, match="meta.json"):
        save_checkpoint(tmp_path, spec, build_model(spec).state_dict(),
                        {"when": object()})


def test_a_truncated_newest_checkpoint_falls_back_to_the_one_before(tmp_path, caplog):
    import logging

    from runner import storage
    from runner.model.checkpoint import load_newest_intact

    spec = classifier_2()
    torch.manual_seed(0)
    states = {}
    for epoch in (1, 2, 3):
        states[epoch] = build_model(spec).state_dict()
        save_checkpoint(tmp_path / f"epoch-{epoch:03d}", spec, states[epoch],
                        {"epoch": epoch})
    newest = tmp_path / "epoch-003" / "model.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    with caplog.at_level(logging.WARNING):
        _, state, meta, used = load_newest_intact(
            storage.resolve(str(tmp_path / "epoch-003")))
    assert meta["epoch"] == 2 and used.path.endswith("epoch-002")
    assert all(state[k].equal(states[2][k]) for k in state)
    assert str(tmp_path / "epoch-003") in caplog.text
    assert newest.stat().st_size == 1000  # the damaged file is left for a look


def test_no_intact_checkpoint_at_all_is_one_clear_error(tmp_path):
    from runner import storage
    from runner.model.checkpoint import load_newest_intact

    (tmp_path / "epoch-001").mkdir()
    with pytest.raises(RunnerError, match="no intact checkpoint in .*epoch-001"):
        load_newest_intact(storage.resolve(str(tmp_path / "epoch-001")))
