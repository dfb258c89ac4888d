"""`ssl-vit study`: grids, cells as recipe runs with their saved configs, resuming, the table and plots."""
import json

import numpy as np
import pytest
import yaml
from PIL import Image

from ssl_vit.apps.study import cell_name, main, markdown_table, parse_grid, run_study


def test_grids_are_products_and_their_union_runs_each_cell_once():
    cells = parse_grid([["patch_size=4,8", "pos_embed=learn,none"], ["patch_size=4", "pos_embed=none,sincos"]])
    assert cells == [{"patch_size": 4, "pos_embed": "learn"}, {"patch_size": 4, "pos_embed": "none"},
                     {"patch_size": 8, "pos_embed": "learn"}, {"patch_size": 8, "pos_embed": "none"},
                     {"patch_size": 4, "pos_embed": "sincos"}]
    assert cell_name(cells[1]) == "patch_size-4_pos_embed-none"


@pytest.mark.parametrize("spec, message", [
    (["patch_size"], "expected KEY=V1,V2"), (["depth="], "expected KEY=V1,V2"),
    (["depth=1", "depth=2"], "depth is given twice"),
])
def test_bad_grids_are_named(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_grid([spec])


def test_the_table_has_a_row_per_cell_and_paired_effects():
    """The effect of an option compares cells that differ in it alone: depth=2 is only seen with
    pos_embed none here, which a mean over all depth=2 cells would mix in."""
    rows = [{"options": {"depth": d, "pos_embed": p}, "params": 1000 * d, "flops": 2e6 * d, "attention_share": 0.1,
             "wall_s": 3.0, "val_top1": top1}
            for d, p, top1 in [(1, "learn", 0.5), (1, "none", 0.2), (2, "none", 0.3), (2, "sincos", 0.9)]]
    table = markdown_table(rows, ["depth", "pos_embed"])
    assert "| 2 | none | 2 | 4.0 | 10 | 3 | 30.0 |" in table
    assert "| depth | 2 vs 1 | 1 | +10.0 | +10.0 to +10.0 | 1/1 |" in table
    assert "| pos_embed | none vs learn | 1 | -30.0 | -30.0 to -30.0 | 0/1 |" in table
    assert "sincos vs learn" not in table  # no cell with depth 2 and learn to pair with


@pytest.fixture()
def tiny_data(tmp_path):
    rng = np.random.default_rng(0)
    for split, count in (("train", 16), ("val", 4)):  # one batch of 32
        for label in ("a", "b"):
            folder = tmp_path / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                value = 40 if label == "a" else 210
                pixels = np.clip(rng.normal(value, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return str(tmp_path / "train"), str(tmp_path / "val")


def test_two_tiny_cells_run_resume_and_rerun_on_another_budget(tiny_data, tmp_path, capsys):
    train, val = tiny_data
    out = tmp_path / "study"
    argv = ["--output", str(out), "--train", train, "--val", val, "--epochs", "1", "--threads", "1",
            "--grid", "embed_dim=16", "depth=1", "num_heads=2", "pos_embed=learn,none"]
    assert main(argv) == 0
    study = json.loads((out / "study.json").read_text())
    assert [c["options"]["pos_embed"] for c in study["cells"]] == ["learn", "none"] and not study["failed"]
    learn, none = study["cells"]
    assert learn["params"] - none["params"] == 17 * 16  # the learned position table (4x4 patches + CLS): the option reached the model
    for cell in study["cells"]:
        assert 0 <= cell["val_top1"] <= 1 and cell["steps"] == 1 and cell["flops"] > 0
        config = yaml.safe_load(open(cell["config"]))  # the cell is a normal recipe run with its config
        assert config["model"]["init_args"]["backbone_kwargs"]["pos_embed"] == cell["options"]["pos_embed"]
        assert config["model"]["init_args"]["weights"] is None
    table = (out / "study.md").read_text()
    assert table.count("\n| 16 | 1 | 2 |") == 2
    assert (out / "accuracy_vs_params.png").stat().st_size > 1000 and (out / "accuracy_vs_flops.png").is_file()
    capsys.readouterr()

    assert main(argv) == 0  # resumed: nothing to train
    assert capsys.readouterr().out.count("done before, skipped") == 2
    assert json.loads((out / "study.json").read_text())["cells"] == study["cells"]

    (out / "cells" / learn["name"] / "result.json").unlink()  # one cell lost: only it is run again
    assert main(argv) == 0
    assert capsys.readouterr().out.count("done before, skipped") == 1

    longer = [a if a != "1" or argv[i - 1] != "--epochs" else "2" for i, a in enumerate(argv)]
    assert main(longer) == 0  # another budget: every cell is trained again
    assert "skipped" not in capsys.readouterr().out
    assert [c["steps"] for c in json.loads((out / "study.json").read_text())["cells"]] == [2, 2]


def test_a_failing_cell_is_reported_and_the_others_run(tiny_data, tmp_path, capsys):
    train, val = tiny_data
    summary = run_study(tmp_path / "study", parse_grid([["embed_dim=16", "depth=1", "num_heads=2",
                                                         "pos_embed=learn,bogus"]]), epochs=1, train=train, val=val,
                        threads=1)
    assert [c["options"]["pos_embed"] for c in summary["cells"]] == ["learn"]
    assert len(summary["failed"]) == 1 and "pos_embed must be" in summary["failed"][0]["error"]
    assert "FAILED" in capsys.readouterr().out


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="--epochs must be >= 1"):
        run_study(tmp_path, [{"depth": 1}], epochs=0)
    with pytest.raises(ValueError, match="--train and --val go together"):
        run_study(tmp_path, [{"depth": 1}], epochs=1, train="x")
    with pytest.raises(ValueError, match="trains from scratch"):
        run_study(tmp_path, [{"depth": 1}], epochs=1, recipe="probe/knn_vit_small_patch4_cifar10")
