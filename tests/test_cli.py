"""The `xlora` command line."""

from __future__ import annotations

import pytest
import torch

from xlora.cli import main
from xlora.example import run_example


def test_example_prints_the_scalings_it_computes(capsys):
    assert main(["example", "--seq-len", "5"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("X-LoRA over a tiny Llama: 14 adapted modules x 2 experts")
    printed = torch.tensor([[float(v) for v in line.split()[1:]] for line in lines[2:]])
    expected = run_example(seq_len=5)
    assert printed.shape == (5, 2)
    torch.testing.assert_close(printed, expected, rtol=0, atol=5e-4)
    torch.testing.assert_close(expected.sum(-1), torch.ones(5), rtol=0, atol=1e-6)


def test_unknown_subcommand_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["nonsense"])
    assert exc.value.code == 2
    assert "invalid choice: 'nonsense'" in capsys.readouterr().err
