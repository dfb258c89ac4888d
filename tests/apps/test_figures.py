"""`make figures` (ssl_vit.apps.figures): the measuring chain on a tiny CIFAR-shaped folder with the
smoke recipe, and the step timer it reads."""
import json

import numpy as np
import pytest
from PIL import Image

from ssl_vit.apps.figures import main, markdown
from ssl_vit.training.progress import StepTimer


def test_step_timer_writes_every_step_and_the_median_of_the_rest(tmp_path):
    timer = StepTimer(str(tmp_path / "t" / "steps.json"))
    timer.on_train_start(None, None)
    for _ in range(4):
        timer.on_train_batch_end(None, None, None, None, 0)

    class Trainer:
        is_global_zero = True

    timer.on_train_end(Trainer(), None)
    saved = json.loads((tmp_path / "t" / "steps.json").read_text())
    assert len(saved["step_s"]) == 4 and saved["median_s"] == sorted(saved["step_s"][1:])[1]


@pytest.mark.slow  # child processes: make-shards twice and a 2-step fit
def test_measure_figures_times_sharding_and_each_recipe(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for split, count in (("train", 16), ("test", 8)):
        for i in range(count):
            folder = tmp_path / "cifar10" / split / f"c{i % 2}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")
    assert main(["--data", str(tmp_path / "cifar10"), "--output", str(tmp_path / "out"), "--recipes", "smoke/mae",
                 "--steps", "2"]) == 0
    result = json.loads((tmp_path / "out" / "figures.json").read_text())
    assert result["make_shards"]["images"] == 16 and result["make_shards"]["images_per_s"] > 0
    run = result["recipes"]["smoke/mae"]
    assert run["steps"] == 2 and run["median_step_s"] > 0 and run["wall_s"] >= run["median_step_s"]
    assert result["machine"]["cpus"] >= 1 and result["machine"]["date"]
    assert "smoke/mae: 2 steps" in capsys.readouterr().out and "smoke/mae: 2 steps" in markdown(result)


def test_measure_figures_refuses_nothing_to_do_and_a_missing_archive(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--output", str(tmp_path)])
    assert "nothing to measure" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="no such file"):
        main(["--data", str(tmp_path / "missing.tar.gz"), "--output", str(tmp_path / "o")])
