"""The `videomamba` command: help texts that teach, and exit status 2 for a bad command line or config."""
import subprocess
import sys

import pytest

from pipeline.cli import SUBCOMMANDS, build_parser, main, without_local_rank


def test_no_command_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    assert "synth" in capsys.readouterr().out


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_every_subcommand_has_a_teaching_help(name, capsys):
    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "not available in this build" not in out, f"`videomamba {name}` has no module yet"
    assert len(out.splitlines()) > 5  # options with explanations, not a bare usage line


def test_a_subcommand_whose_module_is_missing_says_so_and_exits_2(monkeypatch, capsys):
    monkeypatch.setitem(SUBCOMMANDS, "eval", ("pipeline.stages.no_such_module", "zero-shot retrieval"))
    assert main(["eval"]) == 2
    assert "videomamba eval: not available in this build" in capsys.readouterr().err


def test_eval_without_its_required_options_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["eval", "--config", "configs/eval_retrieval.yaml"])
    assert e.value.code == 2
    assert "--checkpoint" in capsys.readouterr().err


def test_bad_run_config_exits_2_naming_the_key(tmp_path, capsys):
    cfg = tmp_path / "demo.yaml"
    cfg.write_text("synth:\n  vidoes: 3\n")
    assert main(["run", "--config", str(cfg), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "synth.vidoes" in err and "synth.videos" in err and "demo.yaml" in err


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "pretrain" in out.stdout
    assert build_parser().prog == "videomamba"


def test_the_deepspeed_launchers_local_rank_is_accepted(capsys):
    assert without_local_rank(["--local_rank", "1", "pretrain", "--local-rank=3", "x=1"]) == ["pretrain", "x=1"]
    with pytest.raises(SystemExit) as e:
        main(["--local_rank=0", "pretrain", "--help"])
    assert e.value.code == 0 and "--config" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [
    ["pretrain", "--config", "configs/stage1_align.yaml", "--resume", "auto", "data.num_frames=0"],
    ["pretrain", "--config", "configs/stage1_align.yaml", "train.seed=1", "--resume", "auto", "data.num_frames=0"],
    ["pretrain", "data.num_frames=0", "--config", "configs/stage1_align.yaml", "--resume", "auto"],
    ["eval", "--config", "configs/eval_retrieval.yaml", "--checkpoint", "x", "--dataset", "synthetic",
     "--annotations", "a.json", "--videos", "v", "--out", "o", "data.num_frames=0"],
    ["run", "--config", "configs/demo.yaml", "synth.videos=1", "--out", "o", "stage1.overrides=7"],
])
def test_overrides_are_taken_anywhere_on_the_line(argv, capsys):
    """`--resume auto key=value`: argparse alone refuses overrides after an option ("unrecognized arguments")."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments" not in err and "config error" in err, err


def test_overrides_keep_their_order_and_unknown_options_are_still_refused(capsys):
    from pipeline.cli import parsed

    parser = build_parser(only="pretrain")
    args = parsed(parser, ["pretrain", "--config", "c.yaml", "a.b=1", "--resume", "auto", "a.b=2", "c.d=3"])
    assert args.overrides == ["a.b=1", "a.b=2", "c.d=3"] and args.resume == "auto"
    with pytest.raises(SystemExit) as e:
        parsed(parser, ["pretrain", "--config", "c.yaml", "--no-such-option", "a.b=1"])
    assert e.value.code == 2 and "unrecognized arguments: --no-such-option" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # `shard` takes no overrides
        parsed(build_parser(only="shard"), ["shard", "--input", "m.csv", "--out", "o", "a.b=1"])
