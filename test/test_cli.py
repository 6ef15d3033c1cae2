"""The CLI front: help with examples, clear errors naming the file, non-zero exits."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from usn_perception.cli import build_parser, load_commands, main

_COMMANDS = load_commands()


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as e:
        main(['--help'])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in _COMMANDS:
        assert name in out


@pytest.mark.parametrize('name', sorted(_COMMANDS))
def test_every_subcommand_help_has_an_example(name, capsys):
    with pytest.raises(SystemExit) as e:
        main([name, '--help'])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert 'example:' in out and f'usn-perception {name}' in out


def test_console_script_is_installed():
    exe = [sys.executable, '-m', 'usn_perception.cli', 'models', '--json']
    result = subprocess.run(exe, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert isinstance(json.loads(result.stdout), list)


def test_broken_dataset_json_names_the_file(tmp_path, capsys):
    bad = tmp_path / 'broken.json'
    bad.write_text('{"images": [}')
    code = main(['evaluate', '--data', str(bad), '--model', str(tmp_path / 'nomodel.json')])
    assert code != 0
    err = capsys.readouterr().err
    assert 'error' in err and ('nomodel.json' in err or 'broken.json' in err)


def test_corrupt_model_names_the_file(tmp_path, capsys):
    model = tmp_path / 'model.json'
    model.write_text('{"format": "something else"}')
    (tmp_path / 'model.pt').write_bytes(b'garbage')
    data = tmp_path / 'd.json'
    data.write_text('{}')
    code = main(['evaluate', '--data', str(data), '--model', str(model)])
    assert code == 1
    assert str(model) in capsys.readouterr().err


def test_bad_arguments_exit_non_zero():
    parser = build_parser()
    with pytest.raises(SystemExit) as e:
        parser.parse_args(['certify-nothing'])
    assert e.value.code != 0
    with pytest.raises(SystemExit):
        parser.parse_args(['make-dataset', '--out', 'x', '--size', '12'])


def test_make_dataset_refuses_existing_output(tmp_path, capsys):
    (tmp_path / 'full').mkdir()
    (tmp_path / 'full' / 'keep.txt').write_text('precious')
    code = main(['--quiet', 'make-dataset', '--out', str(tmp_path / 'full'), '--count', '10'])
    assert code == 1
    assert (tmp_path / 'full' / 'keep.txt').read_text() == 'precious'
    assert 'full' in capsys.readouterr().err


def test_negative_number_lists_are_values():
    from usn_perception.cli import join_negative_lists

    assert join_negative_lists(['certify', '--beta', '-0.1,0.1', '--alpha', '0.8,1.2']) == [
        'certify', '--beta=-0.1,0.1', '--alpha', '0.8,1.2']
    assert join_negative_lists(['--beta', '-1e-2,2']) == ['--beta=-1e-2,2']
    assert join_negative_lists(['--quiet', '--out', 'x']) == ['--quiet', '--out', 'x']


def test_cli_choices_match_the_network():
    """The CLI spells the readouts and architectures out (fast --help); they must agree."""
    from usn_perception.cli.registry import ARCH_CHOICES, READOUT_CHOICES
    from usn_perception.network import ARCHS, READOUTS

    assert READOUT_CHOICES == READOUTS and ARCH_CHOICES == ARCHS
