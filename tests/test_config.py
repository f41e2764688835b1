"""SHDConfig: one declaration of the SHD options, their validation, and their flags in timm and diffusers style."""
from __future__ import annotations

import argparse

import pytest

from shd_plugins import SHDConfig


def test_defaults_are_the_papers():
    config = SHDConfig()
    assert (config.weight, config.temperature, config.layers, config.merge, config.loss, config.grouping,
            config.tokens, config.per_row) == (1.0, 1.0, 'uniform', 'shd', 'kl', 'progressive', 'all', False)
    assert config.enabled and not SHDConfig(weight=0).enabled


@pytest.mark.parametrize('options, message', [
    (dict(merge='max'), "Unknown merge 'max'; choose one of \\('shd', 'mean', 'select'\\)"),
    (dict(loss='ce'), "Unknown loss 'ce'"),
    (dict(grouping='random'), "Unknown grouping 'random'"),
    (dict(tokens='cls'), "Unknown tokens 'cls'"),
    (dict(temperature=0.0), 'temperature must be > 0 and finite, got 0.0'),
    (dict(temperature=float('inf')), 'temperature must be > 0 and finite, got inf'),
    (dict(weight=-1.0), 'weight must be >= 0 and finite'),
    (dict(weight=float('nan')), 'weight must be >= 0 and finite'),
    (dict(layers='middle'), "Unknown layer spec 'middle'. Use 'uniform'"),
    (dict(layers=[(1, 2, 3)]), r'Layer pairs are \(teacher, student\), got \(1, 2, 3\)'),
])
def test_bad_options_are_refused_when_the_config_is_made(options, message):
    with pytest.raises(ValueError, match=message):
        SHDConfig(**options)


def test_config_is_frozen_and_replace_validates_again():
    config = SHDConfig(layers=[[3, 1], [1, 0]])
    assert config.layers == ((3, 1), (1, 0))  # hashable copy of explicit pairs
    with pytest.raises(AttributeError):
        config.weight = 2.0
    assert config.replace(merge='mean').merge == 'mean'
    with pytest.raises(ValueError, match="Unknown merge 'x'"):
        config.replace(merge='x')


@pytest.mark.parametrize('style, prefix', [('timm', '--shd-'), ('diffusers', '--shd_')])
def test_flags_in_both_styles_round_trip(style, prefix):
    parser = argparse.ArgumentParser()
    SHDConfig.add_args(parser, style)
    sep = '-' if style == 'timm' else '_'
    args = parser.parse_args([
        f'{prefix}weight', '0.5', f'{prefix}temperature', '2', f'{prefix}layers', '3:1,1:0', f'{prefix}merge', 'mean',
        f'{prefix}loss', 'mse', f'{prefix}grouping', 'balanced', f'{prefix}tokens', 'patch', f'{prefix}per{sep}row'])
    assert SHDConfig.from_args(args) == SHDConfig(
        weight=0.5, temperature=2.0, layers='3:1,1:0', merge='mean', loss='mse', grouping='balanced', tokens='patch',
        per_row=True)
    assert SHDConfig.from_args(parser.parse_args([])) == SHDConfig()


def test_flags_validate_choices_and_values(capsys):
    parser = argparse.ArgumentParser(prog='train.py')
    SHDConfig.add_args(parser, 'diffusers')
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(['--shd_merge', 'max'])
    assert exit_info.value.code == 2
    assert "argument --shd_merge: invalid choice: 'max'" in capsys.readouterr().err
    with pytest.raises(ValueError, match='temperature must be > 0'):
        SHDConfig.from_args(parser.parse_args(['--shd_temperature', '-1']))


def test_add_args_leaves_flags_the_parser_has_and_takes_recipe_defaults():
    parser = argparse.ArgumentParser()
    parser.add_argument('--shd-weight', dest='shd_weight', type=float, default=3.0)
    SHDConfig.add_args(parser, 'timm', defaults=SHDConfig(temperature=4.0, layers=[(1, 0)]))
    args = parser.parse_args([])
    assert (args.shd_weight, args.shd_temperature, args.shd_layers) == (3.0, 4.0, '1:0')
    assert SHDConfig.from_args(args).layers == '1:0'
    with pytest.raises(ValueError, match="Unknown flag style 'fairseq'"):
        SHDConfig.add_args(parser, 'fairseq')


def test_from_args_reads_a_dict_and_ignores_other_keys():
    assert SHDConfig.from_args({'shd_weight': 2.0, 'lr': 1e-3}) == SHDConfig(weight=2.0)
