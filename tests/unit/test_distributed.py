"""Distributed router training on the CPU (gloo): `harmonica train-router --nproc 2` under torchrun."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from harmonica_core.cli import build_parser, main, training_argv, training_request
from harmonica_core.distributed import World, launch
from harmonica_core.router import read_router
from harmonica_core.sampling import PromptEmbeddings
from harmonica_core.train_config import TrainConfig
from harmonica_core.training import train_router

ROOT = Path(__file__).resolve().parents[2]


def test_two_gloo_processes_train_the_router_one_process_trains(digits, tmp_path):
    config = TrainConfig(steps=4, iterations=9, batch_size=4, lambda_every=6, beta=1e-5, seed=1)
    out, checkpoint = tmp_path / "router.safetensors", tmp_path / "checkpoint.pt"
    argv = training_argv("digits", config, 4, out, checkpoint, "cpu")
    done = subprocess.run(
        [sys.executable, "-m", "harmonica_core.cli", *argv, "--nproc", "2"], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("wrote") == 1  # rank 0 alone says it
    router, metadata = read_router(out)
    assert metadata.training["processes"] == 2
    torch.testing.assert_close(router.logits, train_router(digits, config).logits.detach(), atol=1e-4, rtol=0)
    # The checkpoint rank 0 wrote is the run's whole state: one process resumes from it (here: at the end).
    resumed = train_router(digits, config, checkpoint=checkpoint)
    torch.testing.assert_close(resumed.logits, router.logits, atol=0, rtol=0)


def test_each_rank_takes_its_share_of_every_kind_of_batch_value():
    embeddings = PromptEmbeddings(torch.arange(4.0)[:, None, None], torch.ones(4, 1))
    first, second = World(0, 2), World(1, 2)
    assert first.share([1, 2, 3, 4]) == [1, 2] and second.share([1, 2, 3, 4]) == [3, 4]
    assert torch.equal(second.share(torch.arange(8).view(4, 2)), torch.tensor([[4, 5], [6, 7]]))
    assert second.share(embeddings).embeds.flatten().tolist() == [2.0, 3.0]
    assert World().share([1, 2, 3]) == [1, 2, 3] and first.share(None) is None


def test_the_service_request_becomes_cli_arguments_that_parse_back_to_it(tmp_path):
    config = TrainConfig(objective="ltc", steps=10, iterations=30, batch_size=6, lr=0.05, beta=3e-5, seed=7)
    args = build_parser().parse_args(training_argv("digits", config, 12, tmp_path / "r", tmp_path / "c", "cpu"))
    request = training_request(args)
    assert {name: request[name] for name in asdict(config) if name != "frozen"} == {
        name: value for name, value in asdict(config).items() if name != "frozen"
    }
    assert request["eval_samples"] == 12 and args.checkpoint == tmp_path / "c"


def test_a_batch_the_processes_cannot_share_is_refused_before_any_starts(tmp_path, capsys):
    code = main(["train-router", "--nproc", "2", "--batch-size", "3", "--out", str(tmp_path / "r.safetensors")])
    assert code == 2
    assert "batch_size 3 must be a multiple of the 2 training processes" in capsys.readouterr().err


def test_more_processes_than_gpus_is_refused_before_torchrun_starts():
    with pytest.raises(ValueError, match="64 training processes need 64 GPUs"):
        launch(["train-router"], 64, "cuda")
