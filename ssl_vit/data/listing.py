"""List the image files of a folder, once each, for the shard writer and ``ImageFolderDataModule``.

Two layouts:

* **labelled** (ImageFolder): ``ROOT/<class>/<image>``; every non-hidden sub-folder of ``ROOT`` is a
  class (sorted names give the indices), every file under it (recursively) a sample of that class;
* **unlabelled**: every file under ``ROOT`` (recursively), label ``-1``, no classes.

``labels="auto"`` picks unlabelled when ``ROOT`` holds image files (by extension) and no sub-folder,
labelled when it holds sub-folders and no image file, and refuses the ambiguous mix.

**Links.** Symbolic links are followed except where that would list a file twice or never end: a
folder link whose target lies inside the tree (its files are listed where they really are, or it is
a loop such as ``a/up -> ..``), or that contains the tree, or whose target was already walked; a file
link whose target is listed already; a broken link. Each is reported (``skipped``, and one logged
warning per listing). Links that lead out of the tree (a class folder on another disk) are followed.
Hidden entries (``.name``) are ignored.

**Empty classes.** A class folder without files stays a class, so that the class indices are those
of the folder names (the same in every split of one tree); a warning names it.
"""
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Set, Tuple, Union

from ssl_vit.data.decode import IMAGE_SUFFIXES

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
UNLABELLED = -1
LABEL_MODES = ("auto", "folders", "none")


@dataclass
class ImageListing:
    """What :func:`list_images` found.

    Attributes:
        classes: class names in index order (empty when unlabelled).
        items: ``(path, label)`` of every file, each real file once (label -1 when unlabelled).
        skipped: ``{"path", "reason"}`` of every link left out.
        empty_classes: class names with no file.
    """

    classes: List[str]
    items: List[Tuple[str, int]]
    skipped: List[Dict[str, str]] = field(default_factory=list)
    empty_classes: List[str] = field(default_factory=list)


def _inside(path: str, tree: str) -> bool:
    return os.path.commonpath([path, tree]) == tree


class _Walker:
    """Depth-first walk (a folder's files, then its sub-folders, sorted by name) that follows no link
    twice and none back into the tree."""

    def __init__(self, tree: str) -> None:
        self.tree = tree
        self.visited: Set[str] = {tree}
        self.files: List[Tuple[str, int, str, bool]] = []  # path, label, real path, is a link
        self.skipped: List[Dict[str, str]] = []

    def folder_reason(self, path: str, real: str, link: bool) -> str:
        """Why a folder is not walked ('' when it is)."""
        if link and _inside(real, self.tree):
            return f"link to {real}, inside the tree (a loop, or files listed where they are)"
        if _inside(self.tree, real):
            return f"link to {real}, which contains the tree"
        if real in self.visited:
            return f"{'link to ' if link else ''}{real}, already listed (a loop or a second link)"
        return ""

    def walk(self, directory: str, real_dir: str, label: int) -> None:
        entries = sorted((e for e in os.scandir(directory) if not e.name.startswith(".")), key=lambda e: e.name)
        folders = []
        for entry in entries:
            link = entry.is_symlink()
            real = os.path.realpath(entry.path) if link else os.path.join(real_dir, entry.name)
            if entry.is_dir():
                folders.append((entry, real, link))
            elif link and not os.path.exists(entry.path):
                self.skipped.append({"path": entry.path, "reason": "broken link"})
            else:
                self.files.append((entry.path, label, real, link))
        for entry, real, link in folders:
            reason = self.folder_reason(entry.path, real, link)
            if reason:
                self.skipped.append({"path": entry.path, "reason": reason})
                continue
            self.visited.add(real)
            self.walk(entry.path, real, label)

    def items(self) -> List[Tuple[str, int]]:
        """Every real file once: files that are not links first, then links to files not yet listed."""
        claimed = {real for _, _, real, link in self.files if not link}
        items = []
        for path, label, real, link in self.files:
            if link:
                if real in claimed:
                    self.skipped.append({"path": path, "reason": f"link to {real}, already listed"})
                    continue
                claimed.add(real)
            items.append((path, label))
        return items


def _is_image(entry: os.DirEntry) -> bool:
    return entry.is_file() and os.path.splitext(entry.name)[1].lower() in IMAGE_SUFFIXES


def list_images(root: PathLike, labels: str = "auto") -> ImageListing:
    """The files of ``root`` and their labels (see the module docstring for layouts and links).

    Args:
        root: the folder.
        labels: ``"folders"`` (``root/<class>/<image>``), ``"none"`` (unlabelled, recursive) or
            ``"auto"`` (decided by what ``root`` holds at its top level).

    Returns:
        The listing (also logs a warning for skipped links and empty classes).

    Raises:
        FileNotFoundError / NotADirectoryError: ``root`` is missing or not a folder.
        ValueError: an unknown ``labels``, no class folder with ``labels="folders"``, or a top level
            that mixes image files and folders with ``labels="auto"``.
    """
    if labels not in LABEL_MODES:
        raise ValueError(f"labels must be one of {LABEL_MODES}, got {labels!r}")
    path = Path(root)
    if not path.exists():
        raise FileNotFoundError(f"input directory {str(root)!r} does not exist")
    if not path.is_dir():
        raise NotADirectoryError(f"input {str(root)!r} is not a directory")
    top = [e for e in os.scandir(path) if not e.name.startswith(".")]
    folders = sorted(e.name for e in top if e.is_dir())
    if labels == "auto":
        top_images = sorted(e.name for e in top if _is_image(e))
        if folders and top_images:
            raise ValueError(
                f"{str(root)!r} holds both image files ({top_images[0]}, ...) and folders ({folders[0]}, ...): "
                "put every image in a class folder (DIR/<class>/<image>), or read the whole tree without labels "
                "(--unlabelled, labels='none')"
            )
        labels = "folders" if folders else "none"
    if labels == "folders" and not folders:
        raise ValueError(
            f"no class folders in {str(root)!r}: expected the ImageFolder layout DIR/<class>/<image> "
            "(or read it without labels: --unlabelled, labels='none')"
        )
    walker = _Walker(os.path.realpath(path))
    classes = folders if labels == "folders" else []
    if classes:
        # Claim every class folder before walking any, so that a link inside one class to another
        # class's folder (kept elsewhere) is the one left out.
        kept = []
        for index, name in enumerate(classes):
            entry = os.path.join(path, name)
            link = os.path.islink(entry)
            real = os.path.realpath(entry) if link else os.path.join(walker.tree, name)
            reason = walker.folder_reason(entry, real, link)
            if reason:
                walker.skipped.append({"path": entry, "reason": reason})
                continue
            walker.visited.add(real)
            kept.append((entry, real, index))
        for entry, real, index in kept:
            walker.walk(entry, real, index)
    else:
        walker.walk(str(path), walker.tree, UNLABELLED)
    items = walker.items()
    listing = ImageListing(classes, items, walker.skipped)
    if walker.skipped:
        shown = "; ".join(f"{s['path']} ({s['reason']})" for s in walker.skipped[:3])
        more = f" and {len(walker.skipped) - 3} more" if len(walker.skipped) > 3 else ""
        logger.warning("%s: %d link(s) not followed: %s%s", root, len(walker.skipped), shown, more)
    used = {label for _, label in items}
    listing.empty_classes = [name for index, name in enumerate(classes) if index not in used]
    if listing.empty_classes:
        warn_empty_classes(root, listing.empty_classes, "no file")
    return listing


def warn_empty_classes(root: PathLike, names: List[str], what: str) -> None:
    """Log that classes of ``root`` have ``what`` (they keep their indices)."""
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    logger.warning(
        "%s: %d class folder(s) with %s: %s (kept as classes without samples, so that the class indices "
        "stay those of the sorted folder names)", root, len(names), what, shown,
    )
