"""The recipes, shipped inside the package (a wheel installs them beside the code), and how a
``--config`` value finds one by name.

    ssl-vit fit --config mae/vit_base_patch16_in1k            # the packaged recipe
    ssl-vit fit --config recipes/mae/vit_base_patch16_in1k.yaml   # the same (the checkout-era path)
    ssl-vit fit --config my_recipe.yaml                       # a file that exists always wins

The folders hold YAML only (``slurm/`` the sbatch template); this ``__init__`` is what makes them a
package that ``pip install`` copies.
"""
import difflib
from pathlib import Path
from typing import List

RECIPES_DIR = Path(__file__).resolve().parent
SUFFIXES = (".yaml", ".yml")


def packaged_recipes() -> List[str]:
    """Every packaged recipe by name (``mae/vit_base_patch16_in1k``), sorted."""
    return sorted(str(p.relative_to(RECIPES_DIR).with_suffix("")) for s in SUFFIXES for p in RECIPES_DIR.rglob(f"*{s}"))


def find_recipe(value: str) -> Path:
    """The file a ``--config`` value names: the path itself when it exists, else the packaged recipe
    of that name (``.yaml`` optional, a leading ``recipes/`` ignored).

    Raises:
        FileNotFoundError: neither a file nor a packaged recipe; the message names close recipes.
    """
    path = Path(value)
    if path.exists():
        return path
    name = value[len("recipes/"):] if value.startswith("recipes/") else value
    for candidate in [RECIPES_DIR / name] + [RECIPES_DIR / (name + s) for s in SUFFIXES]:
        if candidate.is_file() and RECIPES_DIR in candidate.resolve().parents:
            return candidate
    known = packaged_recipes()
    stem = str(Path(name).with_suffix("")) if Path(name).suffix in SUFFIXES else name
    close = difflib.get_close_matches(stem, known, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; packaged recipes: {', '.join(known)}"
    raise FileNotFoundError(f"--config {value}: no such file, and no packaged recipe of that name{hint}")
