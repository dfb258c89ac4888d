"""Unreadable files get one clear message per kind, naming the file, from every loader and from
``ssl-vit fit --ckpt_path`` (checked before Lightning opens the file): missing, empty, truncated,
random bytes, a safetensors export, pickled code. Corrupt exports (a broken safetensors header, a
broken ``config.json``) name the file and the problem too."""
import os
import re
import runpy
from pathlib import Path
from typing import Callable, Dict

import pytest
import torch
from safetensors.torch import save_file

from ssl_vit.apps.commands import main as command_main
from ssl_vit.checkpoints.dino import read_linear_head
from ssl_vit.checkpoints.io import check_checkpoint_file, safe_torch_load
from ssl_vit.checkpoints.load import load_backbone
from ssl_vit.checkpoints.mae import load_mae
from ssl_vit.checkpoints.timm_export import export_backbone
from ssl_vit.models.backbone import create_backbone

ROOT = Path(__file__).resolve().parents[2]
SMOKE = str(ROOT / "ssl_vit" / "recipes" / "smoke" / "mae.yaml")


def _truncated(path: Path) -> None:
    torch.save({"state_dict": {"w": torch.randn(64, 64)}}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# kind -> (write the file, the message every reader gives)
KINDS: Dict[str, tuple] = {
    "missing": (lambda p: None, r"checkpoint not found: .*bad\.ckpt"),
    "empty": (lambda p: p.write_bytes(b""), r"bad\.ckpt is empty \(0 bytes\), not a checkpoint"),
    "truncated": (_truncated, r"bad\.ckpt is truncated or damaged \(\d+ bytes\): a zip archive .* without its end"),
    "random": (lambda p: p.write_bytes(os.urandom(4096).replace(b"\x80", b"\x00").replace(b"PK", b"QK")),
               r"bad\.ckpt is not a torch checkpoint: it starts with .*neither a zip archive .* nor a pickle"),
    "safetensors": (lambda p: save_file({"w": torch.ones(2)}, str(p)),
                    r"bad\.ckpt is a safetensors file, not a checkpoint: an exported backbone .*load_backbone"),
    # (a reference to a function a weights-only load refuses; the payloads that run code when unpickled
    # are in test_security.py)
    "pickled code": (lambda p: torch.save({"x": os.system}, p),
                     r"bad\.ckpt cannot be read as a weights-only checkpoint: it holds pickled objects other than "
                     r"tensors and plain containers \((posix|nt)\.system\)"),
}


@pytest.fixture(params=sorted(KINDS))
def bad_file(request, tmp_path) -> tuple:
    write, message = KINDS[request.param]
    path = tmp_path / "bad.ckpt"
    write(path)
    return request.param, path, message


def test_the_checker_names_each_kind(bad_file):
    kind, path, message = bad_file
    error = FileNotFoundError if kind == "missing" else ValueError
    with pytest.raises(error, match=message):
        check_checkpoint_file(path)


LOADERS: Dict[str, Callable] = {
    "safe_torch_load": safe_torch_load,
    "load_mae": load_mae,
    "read_linear_head": read_linear_head,
    "export_tool": lambda path: runpy.run_path(str(ROOT / "tools/export_backbone.py"))["main"](
        ["--weights", str(path), "--output", str(path.parent / "out")]),
}


@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_every_loader_gives_the_same_message(loader, bad_file):
    kind, path, message = bad_file
    if kind == "safetensors" and loader == "export_tool":
        pytest.skip("the export tool reads safetensors files (load_backbone, below)")
    with pytest.raises((FileNotFoundError, ValueError), match=message):
        LOADERS[loader](path)


def test_load_backbone_reads_a_safetensors_file_by_its_content_not_its_name(tmp_path):
    """A safetensors file named ``.ckpt`` used to go to torch.load ("UnpicklingError")."""
    model = create_backbone("vit_tiny_patch4_32", embed_dim=32, depth=1, num_heads=2)
    save_file(model.state_dict(), str(tmp_path / "weights.ckpt"))
    loaded = load_backbone(tmp_path / "weights.ckpt", arch="vit_tiny_patch4_32", embed_dim=32, depth=1, num_heads=2)
    assert torch.equal(loaded.pos_embed, model.pos_embed)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_cli_resume_names_the_file_and_the_problem_before_lightning_opens_it(kind, tmp_path, capsys):
    write, message = KINDS[kind]
    path = tmp_path / "bad.ckpt"
    write(path)
    with pytest.raises(SystemExit) as info:  # the ssl-vit command: one message, no traceback
        command_main(["fit", "--config", SMOKE, "--data.train", "unused-{000000..000001}.tar",
                      "--trainer.default_root_dir", str(tmp_path), "--ckpt_path", str(path)])
    assert info.value.code == 1
    error = capsys.readouterr().err
    assert "ssl-vit: error:" in error and "--ckpt_path: " in error and "Traceback" not in error
    assert re.search(message, error), error
    assert "weights_only=False" not in error  # torch's advice to run the file's code


def test_cli_resume_from_an_export_folder_says_what_it_is(tmp_path, capsys):
    model = create_backbone("vit_tiny_patch4_32", embed_dim=32, depth=1, num_heads=2)
    export_backbone(model, tmp_path / "export", check=False)
    with pytest.raises(SystemExit):
        command_main(["fit", "--config", SMOKE, "--trainer.default_root_dir", str(tmp_path),
                      "--ckpt_path", str(tmp_path / "export")])
    assert "is not a checkpoint but an exported backbone" in capsys.readouterr().err


# -- corrupt exports --------------------------------------------------------------------------------
@pytest.fixture
def export(tmp_path) -> Path:
    model = create_backbone("vit_tiny_patch4_32", embed_dim=32, depth=1, num_heads=2)
    return export_backbone(model, tmp_path / "export", check=False)


def test_a_broken_safetensors_header_names_the_file(export):
    weights = export / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:8] + b"{not json" + data[17:])
    with pytest.raises(ValueError, match=rf"{weights} cannot be read as a safetensors file \(\d+ bytes; "):
        load_backbone(export)


def test_a_truncated_safetensors_file_names_the_file(export):
    weights = export / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match=rf"{weights} cannot be read as a safetensors file"):
        load_backbone(weights)


@pytest.mark.parametrize("text, problem", [
    ('{"architecture": "vit_tiny_patch4_32",', r"cannot be read as JSON: .* at line 1, column \d+"),
    ("[1, 2]", "holds a JSON list, not an object"),
    ("\udcff", "cannot be read as JSON: not UTF-8 text"),
])
def test_a_broken_config_json_names_the_file(export, text, problem):
    config = export / "config.json"
    config.write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(ValueError, match=f"{config} {problem}"):
        load_backbone(export)
