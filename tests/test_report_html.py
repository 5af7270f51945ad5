"""The HTML report is fed a small hand-made lineage: three stages (one with a
failed trial and one with a hostile name), a baseline and its verdict."""

import re
import xml.etree.ElementTree as ET
from html.parser import HTMLParser

import pytest

from runner import storage
from runner.growth.variants import best_epoch, verdict
from runner.report_html import render_html, write_html

EVIL = "<script>alert('x')</script> & \"co\""
VOID = {"meta", "br", "hr", "img", "input", "link", "col", "wbr"}


def trial(name, op, accs, gflop_per_epoch, transfer=None):
    """A trial record as ``runner.growth.stage.trial_record`` writes it; no
    ``accs`` means the trial failed before its first epoch."""
    epochs = [{"epoch": i + 1, "val_acc": a, "flops": gflop_per_epoch * 1e9 * (i + 1),
               "cpu_s": 30.0 * (i + 1), "wall_s": 8.0 * (i + 1),
               "checkpoint_path": f"/runs/demo/{name}/epoch-{i + 1:03d}"}
              for i, a in enumerate(accs)]
    record = {"name": name, "variant": {"op": op}, "lr": 0.001,
              "status": "done" if accs else "error",
              "error": None if accs else "RayTaskError: worker died", "epochs": epochs,
              "transfer": transfer}
    if epochs:
        best = best_epoch(epochs)
        record["best"] = {"epoch": best["epoch"], "val_acc": best["val_acc"],
                          "flops": best["flops"], "checkpoint": best["checkpoint_path"]}
        record["compute"] = {k: epochs[-1][k] for k in ("flops", "cpu_s", "wall_s")}
    return record


def stage(index, name, trials, winner, before):
    """A stage record; ``before`` is the previous stage (None for the first)."""
    won = next(t for t in trials if t["name"] == winner)
    spent = before["path_compute"] if before else {"flops": 0, "cpu_s": 0, "wall_s": 0}
    parent = before and {"stage": before["name"], "trial": before["winner"],
                         "checkpoint": before["checkpoint"]}
    return {"index": index, "name": name, "parent": parent, "trials": trials,
            "winner": winner, "checkpoint": won["best"]["checkpoint"],
            "val_acc": won["best"]["val_acc"],
            "test": {"accuracy": won["best"]["val_acc"] - 0.02, "images": 200,
                     "per_class": {"cats": 0.7, "dogs": 0.66}},
            "compute": {k: sum(t.get("compute", {}).get(k, 0) for t in trials)
                        for k in spent},
            "path_compute": {k: spent[k] + won["compute"][k] for k in spent}}


def drift(parent, child, logit):
    return {"op": "widen", "acc_parent": parent, "acc_child": child,
            "max_abs_logit_diff": logit}


@pytest.fixture
def lineage():
    seed = stage(1, "seed", [trial("scratch-lr0.001", "scratch", [.55, .61, .64], 40)],
                 "scratch-lr0.001", None)
    widen = stage(2, "widen", [
        trial("widen-x2-lr0.001", "widen", [.66, .69, .70], 90, drift(.64, .64, 1e-5)),
        trial(EVIL, "plain_copy", [.52, .60, .63], 90, drift(.64, .50, 2.9))],
        "widen-x2-lr0.001", seed)
    deepen = stage(3, "deepen & <grow>", [
        trial("deepen_block-lr0.001", "deepen_block", [.71, .73, .74], 150,
              drift(.70, .69, 1.7)),
        trial("deepen_block-lr0.01", "deepen_block", [], 150)],
        "deepen_block-lr0.001", widen)
    base = stage(4, "baseline", [trial("scratch-model=c3-lr0.001", "scratch",
                                       [.52, .58, .63, .66, .69, .71], 140)],
                 "scratch-model=c3-lr0.001", None)
    base["budget_flops"] = deepen["path_compute"]["flops"]
    stages = [seed, widen, deepen]
    return {"run": "demo <run>", "storage": "/runs/demo", "finished": True,
            "data": {"counts": {"train": {"cats": 400, "dogs": 400},
                                "test": {"cats": 100, "dogs": 100}}, "skipped": 1},
            "stages": stages, "baseline": base, "verdict": verdict(stages, base)}


class Checker(HTMLParser):
    """Tags must close in order; the text is collected with entities decoded."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack, self.errors, self.text, self.tags = [], [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.tags.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(tag)

    def handle_data(self, data):
        self.text.append(data)


def parse(page):
    checker = Checker()
    checker.feed(page)
    checker.close()
    return checker


def test_page_is_balanced_html_with_well_formed_svg(lineage):
    page = render_html(lineage)
    checker = parse(page)
    assert page.startswith("<!DOCTYPE html>")
    assert not checker.errors and not checker.stack
    svgs = re.findall(r"<svg.*?</svg>", page, flags=re.S)
    assert len(svgs) == 1 + 4  # the FLOPs plot and one per stage and baseline
    for svg in svgs:
        assert ET.fromstring(svg).tag == "svg"


def test_page_names_every_stage_trial_and_the_verdict(lineage):
    text = "".join(parse(render_html(lineage)).text)
    for s in lineage["stages"] + [lineage["baseline"]]:
        assert s["name"] in text
        for t in s["trials"]:
            assert t["name"] in text
    assert lineage["verdict"]["text"] in text
    assert "baseline" in text and "RayTaskError" in text and "unfinished" not in text


def test_page_is_self_contained_and_escapes_names(lineage):
    page = render_html(lineage)
    assert not re.search(r"https?://", page.replace('xmlns="http://www.w3.org/', ""))
    assert "<script" not in page and "src=" not in page
    escaped = "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; &quot;co&quot;"
    assert escaped in page


def test_missing_pieces_still_render(lineage):
    partial = dict(lineage, finished=False, stages=lineage["stages"][:1])
    del partial["baseline"], partial["verdict"]
    text = "".join(parse(render_html(partial)).text)
    assert "unfinished" in text and "no verdict" in text
    empty = dict(partial, stages=[], data={})
    checker = parse(render_html(empty))
    assert not checker.errors and "no epochs reported yet" in "".join(checker.text)


def test_write_html_writes_into_the_run_folder(lineage, tmp_path):
    storage.write_json(storage.resolve(str(tmp_path / "lineage.json")), lineage)
    written = write_html(str(tmp_path))
    assert written == str(tmp_path / "report.html")
    assert (tmp_path / "report.html").read_text().startswith("<!DOCTYPE html>")
    other = write_html(str(tmp_path), str(tmp_path / "out" / "r.html"))
    assert other == str(tmp_path / "out" / "r.html")
    assert (tmp_path / "out" / "r.html").read_bytes() == \
        (tmp_path / "report.html").read_bytes()



def test_report_command_prints_the_text_and_writes_the_page(lineage, tmp_path, capsys):
    from runner.cli import main

    storage.write_json(storage.resolve(str(tmp_path / "lineage.json")), lineage)
    assert main(["report", str(tmp_path), "--html"]) == 0
    out = capsys.readouterr().out
    assert lineage["verdict"]["text"] in out
    assert f"wrote {tmp_path / 'report.html'}" in out
    assert (tmp_path / "report.html").exists()
