"""Every stage refuses a non-finite float option, and an option outside its range, naming the option.

NaN and inf pass checks such as ``value < 0``; ``lr: .inf`` or ``weight_decay: .nan`` used to reach
the first update and make every weight non-finite. The float options are enumerated from each
constructor's signature, so an option added later is covered without touching this file.
"""
import inspect
import math
import re
import typing
from typing import Any, Dict, List, Tuple

import pytest

from ssl_vit.methods.dino import DINO
from ssl_vit.methods.finetune import Finetune, FinetuneTransform
from ssl_vit.methods.knn import KNNEval
from ssl_vit.methods.mae import MAE
from ssl_vit.methods.options import check_options, option_problems
from ssl_vit.methods.probe import LinearProbe

BACKBONE = dict(arch="vit_tiny_patch4_32", backbone_kwargs=dict(embed_dim=32, depth=1, num_heads=2))
TINY: Dict[type, Dict[str, Any]] = {
    MAE: dict(arch="vit_tiny_patch4_32", embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32, decoder_depth=1,
              decoder_num_heads=2),
    DINO: dict(arch="vit_tiny_patch4_32", img_size=32, embed_dim=32, depth=1, num_heads=2, out_dim=32,
               head_hidden_dim=32, head_bottleneck_dim=8),
    LinearProbe: dict(BACKBONE, num_classes=2),
    Finetune: dict(BACKBONE, num_classes=2),
    KNNEval: dict(BACKBONE, num_classes=2),
    FinetuneTransform: dict(size=32),
}


def float_options(cls: type) -> List[Tuple[str, Any]]:
    """``(name, a non-finite value of its type)`` for every float, optional float or float
    sequence argument of ``cls``'s constructor."""
    found = []
    for name, hint in typing.get_type_hints(cls.__init__).items():
        args = set(typing.get_args(hint))
        if hint is float or float in args:
            found.append((name, math.nan))
        elif typing.get_origin(hint) in (typing.Sequence.__origin__, tuple, list) and float in args:
            default = inspect.signature(cls).parameters[name].default
            found.append((name, [math.inf, *list(default)[1:]]))
    return found


CASES = [(cls, name, value) for cls in TINY for name, value in float_options(cls)]


def test_the_enumeration_finds_the_options_the_issue_named():
    names = {(cls.__name__, name) for cls, name, _ in CASES}
    for case in [("MAE", "lr"), ("MAE", "weight_decay"), ("MAE", "weight_decay_end"), ("MAE", "mask_ratio"),
                 ("MAE", "betas"), ("DINO", "student_temp"), ("DINO", "teacher_temp"), ("DINO", "clip_grad"),
                 ("DINO", "momentum_teacher"), ("LinearProbe", "momentum"), ("Finetune", "layer_decay"),
                 ("KNNEval", "temperature"), ("FinetuneTransform", "scale")]:
        assert case in names, case
    assert len(CASES) >= 50


@pytest.mark.parametrize("cls, name, value", CASES, ids=[f"{c.__name__}.{n}" for c, n, _ in CASES])
def test_a_non_finite_float_option_is_refused_naming_it(cls, name, value):
    with pytest.raises(ValueError, match=rf"{name}(\[0\])? must be a finite number, got (nan|inf)"):
        cls(**{**TINY[cls], name: value})


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
@pytest.mark.parametrize("name", ["lr", "weight_decay", "weight_decay_end", "base_lr", "min_lr", "warmup_epochs"])
def test_the_issue_cases_inf_and_nan_schedules(name, value):
    with pytest.raises(ValueError, match=rf"MAE: {name} must be a finite number"):
        MAE(**{**TINY[MAE], name: value})


@pytest.mark.parametrize("cls, option, value, message", [
    (MAE, "drop_path_rate", 1.5, "drop_path_rate must be in [0, 1], got 1.5"),
    (MAE, "drop_path_rate", -0.1, "drop_path_rate must be in [0, 1], got -0.1"),
    (DINO, "drop_path_rate", 1.01, "drop_path_rate must be in [0, 1], got 1.01"),
    (Finetune, "drop_path_rate", 2.0, "drop_path_rate must be in [0, 1], got 2.0"),
    (DINO, "momentum_teacher", 1.5, "momentum_teacher must be in [0, 1], got 1.5"),
    (DINO, "center_momentum", -0.5, "center_momentum must be in [0, 1], got -0.5"),
    (LinearProbe, "momentum", 1.0, "momentum must be in [0, 1), got 1.0"),
    (DINO, "student_temp", 0.0, "student_temp must be > 0, got 0.0"),
    (DINO, "clip_grad", -1.0, "clip_grad must be >= 0, got -1.0"),
    (MAE, "weight_decay_end", -0.1, "weight_decay_end must be >= 0, got -0.1"),
    (MAE, "betas", (0.9, 1.0), "betas[1] must be in [0, 1), got 1.0"),
    (KNNEval, "temperature", 0.0, "temperature must be > 0, got 0.0"),
])
def test_values_out_of_range_are_refused_naming_the_option(cls, option, value, message):
    with pytest.raises(ValueError, match=f"{cls.__name__}: .*" + re.escape(message)):
        cls(**{**TINY[cls], option: value})


def test_mask_ratio_that_leaves_no_patch_visible_is_refused_from_the_token_count():
    # 32x32 images in 4x4 patches: 64 patches; int(64 * (1 - 0.99)) = 0 would stay visible
    with pytest.raises(ValueError, match=r"mask_ratio=0.99 leaves no patch visible.*mask_ratio <= 1 - 1/64"):
        MAE(**{**TINY[MAE], "mask_ratio": 0.99})
    MAE(**{**TINY[MAE], "mask_ratio": 1 - 1 / 64})  # exactly one patch stays visible


def test_every_problem_is_listed_and_nested_options_are_named():
    problems = option_problems({"a": math.nan, "kw": {"mlp_ratio": math.inf}, "b": 2.0, "flag": True, "c": None},
                               {"b": "[0, 1]", "c": "[0, 1]"})
    assert problems == ["a must be a finite number, got nan", "kw.mlp_ratio must be a finite number, got inf",
                        "b must be in [0, 1], got 2.0"]
    check_options("X", {"a": 1.0, "b": [0.5, 0.25]}, {"b": "[0, 1)"})
