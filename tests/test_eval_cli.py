"""``flashsae eval``: settings from the SAE's metadata (as the trainer writes it), flags override them,
a run directory evaluates every SAE in it, JSON output equals evaluate()'s, clear errors (exit 2)."""

from __future__ import annotations

import argparse
import json
import re

import pytest
import torch

import flashsae
from flashsae.eval import evaluate, load_eval_model
from flashsae.eval.cli import add_eval_parser, add_report_parser, run_eval, run_report
from train_helpers import text, tiny_gpt2  # noqa: F401 - text: a fixture the tests request by name


def main(argv: list[str]) -> int:
    """The way flashsae.cli wires the two subcommands in."""
    parser = argparse.ArgumentParser(prog="flashsae")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_eval_parser(subparsers)
    add_report_parser(subparsers)
    args = parser.parse_args(argv)
    return run_eval(args) if args.command == "eval" else run_report(args)


def saved_sae(directory, text, hookpoint="h.1", **metadata):
    sae = flashsae.create("topk", d_in=24, n_latents=64, k=4)
    sae.metadata = {
        "model": str(tiny_gpt2()),
        "hookpoint": hookpoint,  # as recorded on the GPT2Model the trainer loads
        "dataset": str(text),
        "ctx_len": 16,
        "exclude_special_tokens": True,
        "train_config": {"text_field": "text"},
    } | metadata
    sae.save(directory)
    return sae


def test_eval_reads_the_settings_from_the_metadata(tmp_path, text, capsys):
    sae = saved_sae(tmp_path / "sae", text)
    out = tmp_path / "results.json"
    # the whole corpus (its eval part alone holds fewer than 150 tokens)
    argv = ["eval", str(tmp_path / "sae"), "--n-tokens", "150", "--part", "all", "--json", str(out)]
    assert main([*argv, "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "topk at transformer.h.1, 150 tokens of" in printed and "ce_loss_recovered" in printed
    (record,) = json.loads(out.read_text())["saes"]
    assert record["hookpoint"] == "transformer.h.1" and record["tokens"] == 150
    assert record["downstream"] == "causal_lm" and record["config"]["ctx_len"] == 16
    model, tokenizer = load_eval_model(str(tiny_gpt2()), device=torch.device("cpu"))
    direct = evaluate(sae, model, "h.1", str(text), 150, tokenizer=tokenizer, ctx_len=16, part="all")
    for name, value in direct.metrics.items():
        assert record["metrics"][name] == pytest.approx(value, rel=1e-6, abs=1e-12), name


def test_eval_of_a_run_directory_and_flag_overrides(tmp_path, text, capsys):
    saved_sae(tmp_path / "run" / "h.1", text)
    saved_sae(tmp_path / "run" / "h.2", text, hookpoint="h.2")
    out = tmp_path / "results.json"
    argv = ["eval", str(tmp_path / "run"), "--n-tokens", "60", "--downstream", "none", "--ctx-len", "8"]
    assert main([*argv, "--no-exclude-special-tokens", "--json", str(out), "--no-progress"]) == 0
    records = json.loads(out.read_text())["saes"]
    # without downstream metrics the model loads without its LM head (a GPT2Model: no prefix)
    assert [r["hookpoint"] for r in records] == ["h.1", "h.2"]
    assert all(r["downstream"] == "none" and r["config"]["ctx_len"] == 8 for r in records)
    assert all(not r["config"]["exclude_special_tokens"] for r in records)
    # a transcoder names its two hookpoints
    transcoder = flashsae.Transcoder(24, 32, 4)
    transcoder.save(tmp_path / "tc")
    argv = ["eval", str(tmp_path / "tc"), "--model", str(tiny_gpt2()), "--dataset", str(text), "--ctx-len", "16"]
    argv += ["--hookpoint", "h.0.ln_2", "--target-hookpoint", "h.0.mlp", "--n-tokens", "40", "--part", "all"]
    argv += ["--no-progress"]
    assert main(argv) == 0
    assert "transcoder at transformer.h.0.ln_2 -> transformer.h.0.mlp, 40 tokens" in capsys.readouterr().out


def test_eval_errors_exit_2_with_a_message(tmp_path, text, capsys):
    saved_sae(tmp_path / "run" / "a", text)
    saved_sae(tmp_path / "run" / "b", text)
    flashsae.create("topk", d_in=24, n_latents=64, k=4).save(tmp_path / "bare")
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (["eval", str(tmp_path / "missing")], r"path: .*missing does not exist"),
        (["eval", str(empty)], r"empty holds no SAE"),
        (["eval", str(tmp_path / "run"), "--hookpoint", "h.1"], r"--hookpoint: .* holds 2 SAEs"),
        (["eval", str(tmp_path / "bare")], r"--model: the SAE in .*bare records no model"),
        (
            ["eval", str(tmp_path / "bare"), "--model", str(tiny_gpt2())],
            r"--hookpoint: the SAE in .* records no hookpoint",
        ),
        (["eval", str(tmp_path / "run" / "a"), "--hookpoint", "h.9"], r"hookpoints: 'h\.9' matches no module"),
        (["eval", str(tmp_path / "run" / "a"), "--n-tokens", "0"], r"n_tokens: expected a positive int"),
    ]
    for argv, message in cases:
        assert main([*argv, "--no-progress"]) == 2, argv
        error = capsys.readouterr().err
        assert error.startswith("flashsae eval: error: ")
        assert re.search(message, error), (message, error)
    with pytest.raises(SystemExit):
        main(["eval", str(tmp_path), "--downstream", "lm"])
