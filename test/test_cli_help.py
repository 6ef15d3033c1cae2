"""Every registered subcommand explains itself: a description and a working example in --help."""

from __future__ import annotations

import shlex
import textwrap

import pytest

from usn_perception.cli import build_parser, join_negative_lists, load_commands, main

COMMANDS = load_commands()


@pytest.mark.parametrize('name', sorted(COMMANDS))
def test_help_shows_description_and_the_registered_example(name, capsys):
    fn, _, summary, example = COMMANDS[name]
    doc = textwrap.dedent(fn.__doc__ or '').strip()
    assert summary.strip() and doc, f'{name}: needs a summary and a docstring'
    with pytest.raises(SystemExit) as e:
        main([name, '--help'])
    assert e.value.code == 0
    out = capsys.readouterr().out
    usage, _, rest = out.partition('\n\n')
    assert usage.startswith(f'usage: usn-perception {name}')
    assert rest.startswith(f'{summary}.'), 'the description comes right after the usage'
    assert doc.splitlines()[0] in out
    assert f'example:\n  {example}\n' in out, 'the registered example is shown verbatim'


@pytest.mark.parametrize('name', sorted(COMMANDS))
def test_example_is_a_valid_command_line(name):
    """The example names its own subcommand and parses with the current options."""
    example = COMMANDS[name][3]
    argv = shlex.split(example)
    assert argv[:2] == ['usn-perception', name], example
    args = build_parser().parse_args(join_negative_lists(argv[1:]))
    assert args.command == name


def test_top_level_help_gives_each_summary(capsys):
    with pytest.raises(SystemExit):
        main(['--help'])
    out = ' '.join(capsys.readouterr().out.split())
    for name, (_, _, summary, _) in COMMANDS.items():
        assert name in out
        assert ' '.join(summary.split())[:40] in out, name
