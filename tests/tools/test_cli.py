"""Every command-line tool documents its flags with --helpshort and fails a bad flag with one line."""

import pytest

from patch_forcing.tools import convert, extract_latents, extract_text, train_classifier

TOOLS = [(convert, "--ckpt"), (extract_latents, "--images"), (extract_text, "--captions"),
         (train_classifier, "--workdir")]


@pytest.mark.parametrize("tool,flag", TOOLS)
def test_helpshort_lists_every_flag(tool, flag, capsys):
    with pytest.raises(SystemExit) as e:
        tool.main(["tool", "--helpshort"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and flag in out and "--undefok" not in out
    for name in tool.FLAGS:
        assert f"--{name}" in out or f"--[no]{name}" in out


@pytest.mark.parametrize("tool,flag", TOOLS)
def test_bad_flag_is_one_line_exit_2(tool, flag, capsys):
    with pytest.raises(SystemExit) as e:
        tool.main(["tool", "--no_such_flag=1"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "no_such_flag" in err and "\n" not in err
