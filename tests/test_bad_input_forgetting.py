"""Bad forgetting-control options (issue 18): exit 2, a one-line error naming the flag (and the
allowed values), and nothing written: no --out, no rehearsal file beside the traces."""

import pytest
from helpers import finetune_argv, reference_dataset

from q2g import cli


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return reference_dataset(tmp_path_factory.mktemp("dataset"), limit=2)


CASES = [
    (["--rehearsal-fraction", "0.95"], ["--rehearsal-fraction", "0.9"]),
    (["--rehearsal-max-tokens", "2"], ["--rehearsal-max-tokens", "8"]),
    (["--kl-to-base", "-0.1"], ["--kl-to-base", "0"]),
    (["--forgetting-check-steps", "-1"], ["--forgetting-check-steps"]),
    (["--forgetting-check-tokens", "4"], ["--forgetting-check-tokens", "16"]),
    (["--forgetting-check-steps", "3", "--no-eval"], ["--forgetting-check-steps needs the WikiText evaluation"]),
    (["--init-lora-weights", "eva"], ["--init-lora-weights 'eva'", "default, gaussian, pissa, pissa_niter_<n>"]),
    (["--init-lora-weights", "pissa_niter_0"], ["--init-lora-weights 'pissa_niter_0'"]),
    (["--init-lora-weights", "olora", "--kl-to-base", "0.1"], ["--kl-to-base 0.1 needs the base weights unchanged"]),
    (["--init-lora-weights", "pissa", "--use-dora"], ["--use-dora with --init-lora-weights pissa"]),
]


@pytest.mark.parametrize("extra,needles", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_bad_option_exits_2_naming_it(tiny_gemma_dir, dataset, tmp_path, capsys, extra, needles):
    before = sorted(p.name for p in dataset.iterdir())
    out = tmp_path / "out"
    assert cli.call("finetune", finetune_argv(tiny_gemma_dir, dataset, out, *extra)) == 2
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, err
    assert not out.exists()
    assert sorted(p.name for p in dataset.iterdir()) == before
