"""flashsae SAEs on a real TransformerLens HookedTransformer (random weights from a config: no
download), by hook names (skipped without transformer_lens)."""

from __future__ import annotations

import warnings

import pytest
import torch

from flashsae import TopKSAE

pytest.importorskip("transformer_lens")
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # TransformerLens' own import-time deprecations
    from transformer_lens import HookedTransformer, HookedTransformerConfig

from flashsae.integrations import transformer_lens as fs_tl

#: TransformerLens 3.x deprecates HookedTransformer for its TransformerBridge; the hook names are the same
pytestmark = pytest.mark.filterwarnings("ignore:HookedTransformer is deprecated:DeprecationWarning")
HOOK = "blocks.3.hook_resid_post"
D, N, K = 64, 256, 8


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = HookedTransformerConfig(n_layers=4, d_model=D, n_ctx=16, d_head=16, n_heads=4, d_mlp=128, d_vocab=97,
                                     act_fn="gelu", device="cpu")  # fmt: skip
    return HookedTransformer(config).eval()


@pytest.fixture(scope="module")
def sae():
    torch.manual_seed(1)
    return TopKSAE(D, N, K)


@pytest.fixture
def tokens():
    return torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(2))


def test_capture_by_hook_name(model, sae, tokens):
    _, cache = model.run_with_cache(tokens, names_filter=[HOOK])
    with torch.no_grad(), fs_tl.capture(model, HOOK, saes={HOOK: sae}) as acts:
        model(tokens)
    torch.testing.assert_close(acts[HOOK], cache[HOOK], rtol=0, atol=0)
    expected = sae.encode(cache[HOOK])
    assert torch.equal(acts.latents[HOOK].indices, expected.indices)
    torch.testing.assert_close(acts.latents[HOOK].values, expected.values)


def test_splice_by_hook_name_equals_transformer_lens_own_hook(model, sae, tokens):
    def reconstruct(activation, hook):
        return sae(activation).x_hat

    with torch.no_grad():
        expected = model.run_with_hooks(tokens, fwd_hooks=[(HOOK, reconstruct)])
        plain = model(tokens)
        with fs_tl.splice(model, {HOOK: sae}) as spliced:
            got = model(tokens)
        function = fs_tl.splice_hook(sae)
        hooked = model.run_with_hooks(tokens, fwd_hooks=[(HOOK, function)])
        with fs_tl.splice(model, {HOOK: sae}, error_term=True):
            kept = model(tokens)
    assert not torch.allclose(expected, plain)  # the SAE changes the model's output
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(hooked, expected)
    assert torch.equal(function.latents.indices, spliced.latents[HOOK].indices)
    torch.testing.assert_close(kept, plain, rtol=0, atol=0)  # error term, no edit: the model itself


def test_steer_moves_the_residual_by_the_latent_direction(model, sae, tokens):
    latent, amount = 17, 3.0
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=[HOOK])
        with fs_tl.steer(model, HOOK, sae, {latent: amount}), fs_tl.capture(model, HOOK) as after:
            steered = model(tokens)
        function = fs_tl.steer_hook(sae, {latent: amount})
        hooked = model.run_with_hooks(tokens, fwd_hooks=[(HOOK, function)])
    # error term on: the residual moves by exactly amount * W_dec[latent] at every position
    torch.testing.assert_close(after[HOOK] - cache[HOOK], (amount * sae.W_dec[latent]).expand_as(cache[HOOK]),
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    torch.testing.assert_close(hooked, steered)


def test_hook_names_are_checked(model, sae):
    with pytest.raises(ValueError, match=r"blocks\.3\.hook_resid_post"):
        fs_tl.capture(model, "blocks.3.hook_resid_psot")
    with pytest.raises(ValueError, match="saes"):
        fs_tl.splice(model, {"blocks.9.hook_resid_post": sae})
    with pytest.raises(TypeError, match="model"):
        fs_tl.capture(torch.nn.Linear(2, 2), HOOK)
    with pytest.raises(TypeError, match="error_term"):
        fs_tl.splice_hook(sae, error_term="yes")
