"""Without its client package each integration imports fine and, when used, raises an ImportError
that names the extra to install (runs with or without the clients: the client is hidden)."""

from __future__ import annotations

import sys

import pytest
import torch

import flashsae
from flashsae.integrations import nnsight as fs_nnsight
from flashsae.integrations import saebench as fs_saebench
from flashsae.integrations import saelens as fs_saelens
from flashsae.integrations import transformer_lens as fs_tl

D, N, K = 8, 32, 3


@pytest.fixture
def hidden(monkeypatch):
    """Makes `import NAME` fail as if NAME were not installed."""

    def hide(*names: str) -> None:
        for name in names:
            for loaded in [m for m in sys.modules if m == name or m.startswith(f"{name}.")]:
                monkeypatch.delitem(sys.modules, loaded)
            monkeypatch.setitem(sys.modules, name, None)

    return hide


def test_saelens_names_its_extra(hidden, monkeypatch):
    hidden("sae_lens")
    monkeypatch.setattr(fs_saelens, "_CLASSES", {})
    with pytest.raises(ImportError, match=r"flashsae\[saelens\]"):
        fs_saelens.to_saelens(flashsae.TopKSAE(D, N, K))
    with pytest.raises(ImportError, match=r"flashsae\[saelens\]"):
        fs_saelens.register()
    with pytest.raises(ImportError, match=r"flashsae\[saelens\]"):
        fs_saelens.FlashTopKTrainingSAEConfig  # noqa: B018 - the attribute access is the test


def test_saebench_names_its_extra(hidden):
    hidden("sae_bench")
    with pytest.raises(ImportError, match=r"flashsae\[saebench\]"):
        fs_saebench.to_saebench(flashsae.TopKSAE(D, N, K), model_name="gpt2", hook_layer=0)


def test_transformer_lens_names_its_extra(hidden):
    hidden("transformer_lens")
    with pytest.raises(ImportError, match=r"flashsae\[transformer-lens\]"):
        fs_tl.capture(torch.nn.Linear(D, D), "blocks.0.hook_resid_post")


def test_nnsight_names_its_extra(hidden):
    hidden("nnsight")
    with pytest.raises(ImportError, match=r"flashsae\[nnsight\]"):
        fs_nnsight.capture(object())


def test_importing_the_integrations_imports_no_client():
    import subprocess

    code = (
        "import sys, flashsae, flashsae.integrations.saelens, flashsae.integrations.saebench, "
        "flashsae.integrations.transformer_lens, flashsae.integrations.nnsight; "
        "print(sorted(m for m in ('sae_lens', 'sae_bench', 'nnsight', 'transformer_lens') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
