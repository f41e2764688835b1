"""ImageFolder layout: the image extensions read, and a check that names what is wrong with a data folder.

Training (``recipes/``), the top-1 evaluator and the FID reference loader all read ImageFolders
(``<dir>/<class>/<image>``) through torchvision or timm, whose readers fail late and vaguely on a wrong directory.
"""
from __future__ import annotations

from pathlib import Path

__all__ = ['DEFAULT_IMAGE_EXTENSIONS', 'image_extensions', 'find_image_files', 'is_imagefolder', 'check_imagefolder']

DEFAULT_IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg')
_EXPECTED_LAYOUT = '<dir>/<class_name>/<image files> (e.g. <dir>/0/12.png, <dir>/1/7.png)'


def image_extensions() -> tuple[str, ...]:
    """Extensions timm's ImageFolder reader loads (``.png``, ``.jpg``, ``.jpeg`` unless extended).

    Narrower than torchvision's list: a folder of ``.bmp`` files would pass a torchvision check and then
    hold zero samples for ``timm.data.create_dataset``. timm's own list is read when timm is installed, so
    ``timm.data.set_img_extensions`` applies here too.
    """
    try:
        from timm.data.readers.img_extensions import get_img_extensions
    except ImportError:
        return DEFAULT_IMAGE_EXTENSIONS
    return tuple(get_img_extensions())


def find_image_files(folder: str | Path) -> list[Path]:
    """All image files under ``folder``, recursively, in a stable (sorted) order."""
    extensions = image_extensions()
    return sorted(p for p in Path(folder).rglob('*') if p.suffix.lower() in extensions and p.is_file())


def _has_images(folder: Path, recursive: bool = False) -> bool:
    extensions = image_extensions()
    files = folder.rglob('*') if recursive else folder.iterdir()
    return any(f.suffix.lower() in extensions and f.is_file() for f in files)


def _imagefolder_problem(path: Path) -> str | None:
    """Return why ``path`` is not an ImageFolder, or None when it is one."""
    if not path.exists():
        return 'it does not exist'
    if not path.is_dir():
        return 'it is not a directory'
    entries = sorted(path.iterdir())
    class_dirs = [p for p in entries if p.is_dir() and not p.name.startswith('.')]
    if not class_dirs:
        top_images = [p for p in entries if p.is_file() and p.suffix.lower() in image_extensions()]
        if top_images:
            return (
                f'it holds {len(top_images)} image file(s) at the top level (e.g. {top_images[0].name}) but no '
                'class subfolders'
            )
        return 'it has no class subfolders' + ('' if entries else ' (it is empty)')
    nested = [p.name for p in class_dirs if not _has_images(p) and _has_images(p, recursive=True)]
    if nested and len(nested) == len(class_dirs):
        # Readers accept this (images anywhere below a class folder), but it is almost always a dataset root
        # passed where a split folder was meant: torchvision would make 'train'/'val' the two classes, timm
        # (leaf folder names) would silently merge the splits.
        return (
            f"its subfolders ({', '.join(nested[:5])}) hold no images directly, only in deeper folders; this looks "
            f"like a dataset root: pass one split folder instead, e.g. {path / nested[0]}"
        )
    empty = [p.name for p in class_dirs if not _has_images(p, recursive=True)]
    if empty:
        shown = ', '.join(empty[:5]) + (', ...' if len(empty) > 5 else '')
        return f'{len(empty)} class folder(s) hold no image files: {shown}'
    return None


def is_imagefolder(path: str | Path) -> bool:
    """Tell whether ``path`` has the ImageFolder layout ``<dir>/<class_name>/<image files>``."""
    return _imagefolder_problem(Path(path)) is None


def check_imagefolder(path: str | Path) -> Path:
    """Raise a clear error unless ``path`` is an ImageFolder; return it as a Path.

    torchvision's and timm's readers fail late and vaguely (``Found no valid file``, or a silent single
    class) on a wrong directory; checking first names the directory and the expected layout.

    Class folders may nest images deeper (as readers allow), except when no class folder holds images
    directly: that is a dataset root (``<root>/train/<class>/...``) passed in place of a split folder.

    Raises:
        ValueError: ``path`` is missing, not a directory, empty, has images but no class subfolders, has
            class folders without images, or looks like a dataset root rather than a split.
    """
    path = Path(path)
    problem = _imagefolder_problem(path)
    if problem is not None:
        raise ValueError(
            f"{path} is not an ImageFolder: {problem}. Expected layout: {_EXPECTED_LAYOUT}, with image "
            f"extensions {', '.join(image_extensions())}."
        )
    return path
