"""Tests of the digits ImageFolder writer and the ImageFolder layout checks."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from shd_plugins.demo.data import META_FILENAME, write_digits_imagefolder
from shd_plugins.imagefolder import check_imagefolder, is_imagefolder

DIGITS = load_digits()
CLASSES = [str(c) for c in range(10)]


def _files(root: Path, split: str) -> dict[str, list[str]]:
    return {c: sorted(p.name for p in (root / split / c).glob('*.png')) for c in CLASSES}


def test_counts_and_stratification(digits_imagefolder: Path) -> None:
    meta = json.loads((digits_imagefolder / META_FILENAME).read_text())
    train, val = _files(digits_imagefolder, 'train'), _files(digits_imagefolder, 'val')
    per_class = np.bincount(DIGITS.target, minlength=10)

    assert meta['counts'] == {'train': sum(map(len, train.values())), 'val': sum(map(len, val.values()))}
    assert meta['counts']['train'] + meta['counts']['val'] == len(DIGITS.target) == 1797
    for c in CLASSES:
        n_val = len(val[c])
        assert n_val + len(train[c]) == per_class[int(c)]
        assert n_val == round(0.2 * per_class[int(c)])  # stratified: every class keeps 20% in val
        assert not set(val[c]) & set(train[c])


def test_png_mode_size_and_content(digits_imagefolder: Path) -> None:
    for split in ('train', 'val'):
        for path in list((digits_imagefolder / split).glob('*/*.png'))[:20]:
            idx, label = int(path.stem), int(path.parent.name)
            assert DIGITS.target[idx] == label
            with Image.open(path) as img:
                assert img.mode == 'L' and img.size == (32, 32)


def test_pixels_and_idempotence(tmp_path: Path) -> None:
    root = tmp_path / 'digits8'
    meta = write_digits_imagefolder(root, image_size=8)
    path = next((root / 'val' / '3').glob('*.png'))
    expected = np.rint(DIGITS.images[int(path.stem)] * 255 / 16).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(Image.open(path)), expected)  # 8x8: no resampling

    mtime = path.stat().st_mtime_ns
    assert write_digits_imagefolder(root, image_size=8) == meta
    assert path.stat().st_mtime_ns == mtime  # complete folder: nothing rewritten

    path.unlink()  # incomplete folder: rewritten
    assert write_digits_imagefolder(root, image_size=8) == meta
    assert path.is_file()


def test_split_fixed_by_seed(tmp_path: Path) -> None:
    a = write_digits_imagefolder(tmp_path / 'a', image_size=8, seed=0)
    write_digits_imagefolder(tmp_path / 'b', image_size=8, seed=1)
    assert a['class_counts'] == json.loads((tmp_path / 'b' / META_FILENAME).read_text())['class_counts']
    assert _files(tmp_path / 'a', 'val') != _files(tmp_path / 'b', 'val')


def test_settings_mismatch_needs_overwrite(tmp_path: Path) -> None:
    write_digits_imagefolder(tmp_path, image_size=8)
    with pytest.raises(ValueError, match=r'differs from the requested.*overwrite=True'):
        write_digits_imagefolder(tmp_path, image_size=8, val_fraction=0.5)
    meta = write_digits_imagefolder(tmp_path, image_size=8, val_fraction=0.5, overwrite=True)
    assert meta['val_fraction'] == 0.5
    assert sum(1 for _ in (tmp_path / 'val').glob('*/*.png')) == meta['counts']['val']


def test_refuses_foreign_nonempty_dir(tmp_path: Path) -> None:
    (tmp_path / 'notes.txt').write_text('mine')
    with pytest.raises(ValueError, match=rf'{re.escape(str(tmp_path))} exists, is not empty'):
        write_digits_imagefolder(tmp_path, image_size=8)
    with pytest.raises(ValueError, match='val_fraction'):
        write_digits_imagefolder(tmp_path / 'x', val_fraction=1.0)


def test_check_imagefolder_accepts_split(digits_imagefolder: Path) -> None:
    assert check_imagefolder(digits_imagefolder / 'val') == digits_imagefolder / 'val'
    assert is_imagefolder(digits_imagefolder / 'train')


def _make_bad_layouts(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    png = Image.new('L', (4, 4))
    (tmp_path / 'empty').mkdir()
    (tmp_path / 'flat').mkdir()
    png.save(tmp_path / 'flat' / '1.png')
    (tmp_path / 'no_images' / 'cat').mkdir(parents=True)
    (tmp_path / 'no_images' / 'dog').mkdir(parents=True)
    png.save(tmp_path / 'no_images' / 'dog' / '1.png')
    (tmp_path / 'no_images' / 'cat' / 'notes.txt').write_text('not an image')
    (tmp_path / 'root' / 'train' / '0').mkdir(parents=True)
    png.save(tmp_path / 'root' / 'train' / '0' / '1.png')
    (tmp_path / 'a_file').write_text('x')
    return {
        'missing': (tmp_path / 'missing', 'does not exist'),
        'file': (tmp_path / 'a_file', 'not a directory'),
        'empty': (tmp_path / 'empty', r'no class subfolders \(it is empty\)'),
        'flat': (tmp_path / 'flat', '1 image file\\(s\\) at the top level .*no class subfolders'),
        'no_images': (tmp_path / 'no_images', '1 class folder\\(s\\) hold no image files: cat'),
        'root': (tmp_path / 'root', 'dataset root: pass one split folder instead'),
    }


def test_check_imagefolder_errors(tmp_path: Path) -> None:
    for name, (path, reason) in _make_bad_layouts(tmp_path).items():
        assert not is_imagefolder(path), name
        with pytest.raises(ValueError, match=rf'^{re.escape(str(path))} is not an ImageFolder: .*{reason}') as info:
            check_imagefolder(path)
        assert '<dir>/<class_name>/<image files>' in str(info.value)
