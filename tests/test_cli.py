"""The one command-line convention: user errors end as argparse ends a bad flag (`prog: error: ...`, status 2)."""
from __future__ import annotations

import argparse

import pytest

from shd_plugins.cli import ParseKwargs, user_errors


def test_user_errors_print_one_line_and_exit_2(capsys):
    cleaned = []
    with pytest.raises(SystemExit) as exit_info, user_errors('train.py', cleanup=lambda: cleaned.append(True)):
        raise FileNotFoundError('--model_config cfg.json is not a file')
    assert exit_info.value.code == 2 and cleaned == [True]
    assert capsys.readouterr().err == 'train.py: error: --model_config cfg.json is not a file\n'


def test_bugs_keep_their_traceback():
    with pytest.raises(KeyError), user_errors('train.py'):
        raise KeyError('a bug, not a user error')


def test_parse_kwargs_reads_timm_style_words_and_refuses_others(capsys):
    parser = argparse.ArgumentParser(prog='top1.py')
    parser.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs)
    args = parser.parse_args(['--model-kwargs', 'depth=4', 'qk_norm=True', 'act=gelu', 'img_size=(32, 32)'])
    assert args.model_kwargs == {'depth': 4, 'qk_norm': True, 'act': 'gelu', 'img_size': (32, 32)}
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(['--model-kwargs', 'depth'])
    assert exit_info.value.code == 2
    assert "top1.py: error: argument --model-kwargs: expected key=value words (e.g. depth=4), got 'depth'" in (
        capsys.readouterr().err)
