"""`deqlab generate`: sampling from a trained DEQ language model, warm-started solves."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from deqlab.runner.main import run
from deqlab.tasks.lm.generate import generate, load_model, main

from .helpers.runs import TINY_LM, compose_cfg, write_ptb_folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny DEQ-Transformer trained on sentences that count up from a random word."""
    tmp = tmp_path_factory.mktemp("lm")
    root = write_ptb_folder(tmp / "data", learnable=True)
    fast = ["optim.optimizer.lr=1e-2", "trainer.max_epochs=2"]
    run(compose_cfg([*TINY_LM, *fast, f"paths.data_dir={root}"], tmp / "run"))
    return tmp / "run" / "checkpoints" / "best.ckpt", root


def exact(module):
    """The module with a solve tight enough to compare equilibria (tol 1e-10, 200 steps)."""
    module.deq.solver_cfg = replace(module.deq.solver_cfg, tol=1e-10, eval_max_iter=200)
    return module.double()


def test_decoded_log_probs_are_the_whole_texts(trained):
    """Decoding one position at a time, each with every earlier equilibrium as memory, gives
    the log-probabilities one solve of the whole text gives (causal attention)."""
    ckpt, _ = trained
    module, corpus = load_model(ckpt)
    module = exact(module)
    prompt = [corpus.stoi[w] for w in ["w3", "w4"]]
    out = generate(module, prompt, steps=6, temperature=0)
    text = torch.tensor([prompt + out.tokens])
    net = module.net
    with torch.no_grad():
        ctx, z0 = net.inject(text)
        z, _ = module.deq(lambda z: net.cell(z, ctx), z0)
        log_p = net.logits(net.head(z)).double().log_softmax(-1)[0]
    whole = [float(log_p[len(prompt) - 1 + i, t]) for i, t in enumerate(out.tokens)]
    assert out.log_probs == pytest.approx(whole, abs=1e-7)


def test_warm_starts_save_evaluations_and_are_reported(trained, capsys):
    ckpt, _ = trained
    out = main([str(ckpt), "--prompt", "w3 w4 never-seen", "--tokens", "8", "--seed", "1"])
    assert len(out.tokens) == 8 and out.prompt[-1] == load_model(ckpt)[1].stoi["<unk>"]
    assert 0 < out.warm_nfe < out.cold_nfe
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[0].startswith("w3 w4 <unk> | ")
    assert printed[1].startswith(
        f"deqlab generate: 8 tokens; forward solves took {out.warm_nfe} f evaluations "
        f"warm-started ({out.warm_nfe / 8:.1f} per token) against {out.cold_nfe} from zeros"
    )


def test_generate_names_what_it_needs(trained, tmp_path):
    ckpt, _ = trained
    stray = tmp_path / "x" / "best.ckpt"
    stray.parent.mkdir()
    stray.write_bytes(ckpt.read_bytes())
    with pytest.raises(FileNotFoundError, match=r"config_resolved\.yaml not found"):
        load_model(stray)
    module, _ = load_model(ckpt)
    with pytest.raises(ValueError, match="the prompt is empty"):
        generate(module, [], steps=1)


def test_the_deqlab_command_runs_generate(trained):
    import subprocess
    import sys

    from .helpers.runs import ROOT

    ckpt, _ = trained
    args = [sys.executable, "-m", "deqlab", "generate", str(ckpt), "--prompt", "w1 w2"]
    proc = subprocess.run(
        [*args, "--tokens", "3", "--temperature", "0"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        check=True,
    )
    first, report = proc.stdout.strip().splitlines()[-2:]
    prompt, sampled = first.split(" | ")
    assert prompt == "w1 w2" and len(sampled.split()) == 3
    assert report.startswith("deqlab generate: 3 tokens; forward solves took ")
