"""Inference hooks: capture equals the model's own hidden states; splice with an identity-like SAE
leaves the loss unchanged, with the error term leaves the output bit for bit; steering changes the
output exactly by the decoded edit (error term on or off) and changes generated tokens; tuple and
ModelOutput outputs; hooks gone after exceptions; no_grad / inference_mode / autograd."""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import pytest
import torch
from torch import nn

import flashsae
from flashsae.hookpoints import replace_output, resolve_hookpoints
from flashsae.hooks import ablate, capture, splice, steer
from flashsae.hooks.splice import _Steering
from flashsae.outputs import SparseLatents

D = 24
GRAD_MODES = {
    "no_grad": torch.no_grad,
    "inference_mode": torch.inference_mode,
    "autograd": contextlib.nullcontext,
}


def tiny_gpt2(seed: int = 0):
    """A randomly initialized 3-layer GPT-2 built from its config (no download), weights large
    enough (initializer_range 0.2) that the hidden states matter to the logits."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=64, n_embd=D, n_layer=3, n_head=2, n_positions=32, initializer_range=0.2,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    return GPT2LMHeadModel(config).eval()


def tiny_bert(seed: int = 0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32,
    )  # fmt: skip
    return BertModel(config).eval()


@pytest.fixture(scope="module")
def gpt2():
    return tiny_gpt2()


@pytest.fixture
def tokens():
    return torch.randint(1, 64, (3, 9))


def identity_sae(d: int = D) -> flashsae.TopKSAE:
    """A TopK SAE that reconstructs any x exactly: latents relu(x) and relu(-x) (2d of them, at most
    d positive per row, so k = d keeps them all), decoded with +I and -I."""
    sae = flashsae.TopKSAE(d, 2 * d, d)
    with torch.no_grad():
        eye = torch.eye(d)
        sae.W_enc.copy_(torch.cat([eye, -eye]))
        sae.W_dec.copy_(torch.cat([eye, -eye]))
    return sae.eval()


def random_sae(d: int = D, n: int = 96, k: int = 5, architecture: str = "topk") -> flashsae.SAE:
    options = {"k": k} if architecture in ("topk", "batchtopk", "matryoshka") else {}
    sae = flashsae.create(architecture, d_in=d, n_latents=n, **options)
    with torch.no_grad():
        sae.b_enc.add_(0.1)  # some latents fire for the threshold architectures too
    return sae.eval()


def hooks_of(model: nn.Module) -> dict[str, int]:
    """flashsae's forward hooks on the model's modules (transformers adds its own, for
    output_hidden_states, which stay)."""
    counts = {}
    for name, module in model.named_modules():
        ours = [h for h in module._forward_hooks.values() if getattr(h, "__module__", "").startswith("flashsae.")]
        if ours:
            counts[name] = len(ours)
    return counts


# --------------------------------------------------------------------------------------- capture


@pytest.mark.parametrize("mode", GRAD_MODES)
def test_capture_equals_the_models_own_hidden_states(gpt2, tokens, mode):
    with GRAD_MODES[mode]():
        reference = gpt2(tokens, output_hidden_states=True).hidden_states
        with capture(gpt2, ["transformer.h.*", "h.1"]) as acts:
            gpt2(tokens)
    # a glob gives module paths as keys; a single path keeps the caller's spelling (no prefix here)
    assert list(acts) == ["transformer.h.0", "transformer.h.1", "h.1", "transformer.h.2"]
    for layer in range(2):  # hidden_states[i + 1] is block i's output (the last one gets ln_f)
        torch.testing.assert_close(acts[f"transformer.h.{layer}"], reference[layer + 1], rtol=0, atol=0)
    assert acts["h.1"] is acts["transformer.h.1"] or torch.equal(acts["h.1"], acts["transformer.h.1"])
    assert not acts["h.1"].requires_grad
    assert hooks_of(gpt2) == {}


def test_capture_without_detach_keeps_the_graph(gpt2, tokens):
    with capture(gpt2, "transformer.h.0", detach=False) as acts:
        loss = gpt2(tokens, labels=tokens).loss
    (grad,) = torch.autograd.grad(loss, acts["transformer.h.0"])
    assert grad.shape == (3, 9, D) and bool(grad.abs().sum() > 0)


def test_capture_encodes_latents_with_the_given_saes(gpt2, tokens):
    sae = random_sae(architecture="jumprelu")
    with torch.no_grad(), capture(gpt2, [], saes={"transformer.h.1": sae}) as acts:
        gpt2(tokens)
    latents = acts.latents["transformer.h.1"]
    expected = sae.encode(acts["transformer.h.1"])
    assert latents.values.shape[:-1] == (3, 9)
    assert torch.equal(latents.indices, expected.indices) and torch.equal(latents.values, expected.values)


def test_capture_stop_ends_the_forward_after_the_last_hookpoint(gpt2, tokens):
    calls = []
    handle = gpt2.transformer.h[2].register_forward_hook(lambda *_: calls.append(1))
    after_the_call = []
    try:
        with torch.no_grad(), capture(gpt2, ["transformer.h.0", "transformer.h.1"], stop=True) as acts:
            gpt2(tokens)
            after_the_call.append(1)  # not reached: the forward stopped inside the call
    finally:
        handle.remove()
    assert calls == [] and after_the_call == []
    assert set(acts) == {"transformer.h.0", "transformer.h.1"}
    # the early stop belongs to its own context: an enclosing one stays open and working
    with torch.no_grad(), splice(gpt2, {"transformer.h.2": identity_sae()}) as outer:
        with capture(gpt2, "transformer.h.0", stop=True):
            gpt2(tokens)
        assert outer.active
        gpt2(tokens)
        assert "transformer.h.2" in outer.latents
    assert hooks_of(gpt2) == {}


def test_prefix_is_optional_both_ways(gpt2):
    assert resolve_hookpoints(gpt2, ["h.1"]) == ["transformer.h.1"]  # an SAE trained on GPT2Model
    assert resolve_hookpoints(gpt2.transformer, ["transformer.h.1"]) == ["h.1"]
    with pytest.raises(ValueError, match=r"hookpoints: 'transformer\.h\.7' matches no module.*transformer\.h\.1"):
        resolve_hookpoints(gpt2, ["transformer.h.7"])


# --------------------------------------------------------------------------- tuples, ModelOutput


class TupleBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(D, D)

    def forward(self, x):
        return self.linear(x), "extra"


class Pair(NamedTuple):
    hidden: torch.Tensor
    note: str


class NamedTupleBlock(TupleBlock):
    def forward(self, x):
        return Pair(self.linear(x), "kept")


class Toy(nn.Module):
    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block
        self.head = nn.Linear(D, 3)

    def forward(self, x):
        out = self.block(x)
        return self.head(out[0]), out[1]


@pytest.mark.parametrize("block", [TupleBlock, NamedTupleBlock])
def test_tuple_outputs_are_read_and_rewritten_at_their_first_element(block):
    model = Toy(block())
    x = torch.randn(4, 5, D)
    sae = random_sae()
    with torch.no_grad():
        _, note = model(x)
        with capture(model, "block") as acts:
            model(x)
        with splice(model, {"block": sae}):
            spliced, spliced_note = model(x)
    assert torch.equal(acts["block"], model.block.linear(x).detach())
    expected = model.head(sae.decode(sae.encode(acts["block"])))
    torch.testing.assert_close(spliced, expected)
    assert spliced_note == note  # the rest of the tuple is passed on
    assert type(replace_output(Pair(x, "a"), x * 2)) is Pair


def test_model_output_objects(gpt2, tokens):
    """The base model returns a ModelOutput; attention modules return (output, weights) tuples."""
    with torch.no_grad():
        base = gpt2.transformer(tokens).last_hidden_state
        with capture(gpt2, ["transformer", "transformer.h.0.attn"]) as acts:
            clean = gpt2(tokens).logits
        with splice(gpt2, {"transformer": identity_sae()}):
            through_identity = gpt2(tokens).logits
        with splice(gpt2, {"transformer.h.0.attn": random_sae()}):
            changed = gpt2(tokens).logits
    torch.testing.assert_close(acts["transformer"], base, rtol=0, atol=0)
    assert acts["transformer.h.0.attn"].shape == (3, 9, D)
    torch.testing.assert_close(through_identity, clean, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(changed, clean, atol=1e-3)


# ---------------------------------------------------------------------------------------- splice


@pytest.mark.parametrize("mode", GRAD_MODES)
def test_splice_with_an_identity_like_sae_leaves_the_loss_unchanged(gpt2, tokens, mode):
    with GRAD_MODES[mode]():
        clean = gpt2(tokens, labels=tokens).loss
        with splice(gpt2, {"transformer.h.1": identity_sae()}) as spliced:
            loss = gpt2(tokens, labels=tokens).loss
    torch.testing.assert_close(loss, clean, rtol=1e-6, atol=1e-6)
    assert spliced.latents["transformer.h.1"].values.shape == (3, 9, D)
    assert hooks_of(gpt2) == {}


@pytest.mark.parametrize("architecture", ["topk", "batchtopk", "jumprelu", "gated"])
def test_splice_replaces_the_activation_by_the_reconstruction(gpt2, tokens, architecture):
    sae = random_sae(architecture=architecture)
    with torch.no_grad():
        clean = gpt2(tokens).logits
        with capture(gpt2, "transformer.h.1") as clean_acts:
            gpt2(tokens)
        x = clean_acts["transformer.h.1"]
        with splice(gpt2, {"transformer.h.1": sae}), capture(gpt2, "transformer.h.1") as acts:
            spliced = gpt2(tokens).logits
        with splice(gpt2, {"transformer.h.1": sae}, error_term=True), capture(gpt2, "transformer.h.1") as kept:
            with_error_term = gpt2(tokens).logits
    # the capture entered after the splice sees what the splice wrote
    torch.testing.assert_close(acts["transformer.h.1"], sae.decode(sae.encode(x)), rtol=0, atol=0)
    assert not torch.allclose(spliced, clean, atol=1e-3)
    # the error term gives the model its own activation back, bit for bit
    assert torch.equal(kept["transformer.h.1"], x)
    assert torch.equal(with_error_term, clean)


def test_splice_mask_keeps_the_models_activation_where_false(gpt2, tokens):
    sae = random_sae()
    mask = torch.rand(3, 9) < 0.5
    with torch.no_grad():
        with capture(gpt2, "transformer.h.1") as clean:
            gpt2(tokens)
        with splice(gpt2, {"transformer.h.1": sae}, mask=mask), capture(gpt2, "transformer.h.1") as acts:
            gpt2(tokens)
        with ablate(gpt2, "transformer.h.1", mask=mask), capture(gpt2, "transformer.h.1") as zeroed:
            gpt2(tokens)
    x = clean["transformer.h.1"]
    got = acts["transformer.h.1"]
    assert torch.equal(got[~mask], x[~mask])
    torch.testing.assert_close(got[mask], sae.decode(sae.encode(x))[mask], rtol=0, atol=0)
    assert torch.equal(zeroed["transformer.h.1"][~mask], x[~mask])
    assert bool((zeroed["transformer.h.1"][mask] == 0).all())


def test_gradients_flow_through_a_splice(gpt2, tokens):
    sae = random_sae()
    with splice(gpt2, {"transformer.h.1": sae}):
        loss = gpt2(tokens, labels=tokens).loss
    loss.backward()
    assert sae.W_dec.grad is not None and bool(sae.W_dec.grad.abs().sum() > 0)
    gpt2.zero_grad(set_to_none=True)


def test_transcoder_spliced_from_its_input_to_its_output(gpt2, tokens):
    transcoder = flashsae.Transcoder(D, 64, 6, skip=True)
    with torch.no_grad():
        transcoder.W_dec.normal_()
        transcoder.W_skip.normal_(std=0.1)
    key = ("transformer.h.0.ln_2", "transformer.h.0.mlp")
    with torch.no_grad():
        with capture(gpt2, list(key)) as clean:
            gpt2(tokens)
        with splice(gpt2, {key: transcoder}), capture(gpt2, "transformer.h.0.mlp") as acts:
            gpt2(tokens)
        x = clean["transformer.h.0.ln_2"]
        expected = transcoder.decode(transcoder.encode(x), x)
        torch.testing.assert_close(acts["transformer.h.0.mlp"], expected, rtol=0, atol=0)
        with splice(gpt2, {key: transcoder}, error_term=True), capture(gpt2, "transformer.h.0.mlp") as kept:
            gpt2(tokens)
        assert torch.equal(kept["transformer.h.0.mlp"], clean["transformer.h.0.mlp"])
        # the output module runs before the input one: nothing to write yet
        with (
            pytest.raises(RuntimeError, match=r"transformer\.h\.0\.ln_2 ran before transformer\.h\.0\.mlp"),
            splice(gpt2, {("transformer.h.0.mlp", "transformer.h.0.ln_2"): flashsae.Transcoder(D, 64, 6)}),
        ):
            gpt2(tokens)
    assert hooks_of(gpt2) == {}


# ----------------------------------------------------------------------------------------- steer


@pytest.mark.parametrize("error_term", [True, False])
@pytest.mark.parametrize("mode", ["add", "clamp"])
def test_steering_moves_the_activation_by_the_decoded_edit(gpt2, tokens, mode, error_term):
    sae = random_sae(architecture="batchtopk")  # padded latents: empty slots (index -1) in the rows
    with torch.no_grad():
        with capture(gpt2, "transformer.h.1", saes={"transformer.h.1": sae}) as clean:
            gpt2(tokens)
        x = clean["transformer.h.1"]
        dense = clean.latents["transformer.h.1"].to_dense(sae.n_latents).double()
        fired = int(dense.sum((0, 1)).argmax())  # a latent that is active somewhere
        steering = {fired: 3.0, 7: -1.5}
        steering_context = steer(gpt2, "transformer.h.1", sae, steering, mode=mode, error_term=error_term)
        with steering_context as steered, capture(gpt2, "transformer.h.1") as acts:
            gpt2(tokens)
    assert torch.equal(steered.latents["transformer.h.1"].indices, clean.latents["transformer.h.1"].indices)
    # float64 reference: the new activation of each steered latent times its decoder row
    change = torch.zeros(3, 9, D, dtype=torch.float64)
    for latent, value in steering.items():
        current = dense[..., latent]
        new = current + value if mode == "add" else torch.full_like(current, value)
        change += (new - current).unsqueeze(-1) * sae.W_dec[latent].double()
    base = x.double() if error_term else sae.decode(clean.latents["transformer.h.1"]).double()
    torch.testing.assert_close(acts["transformer.h.1"].double(), base + change, rtol=1e-5, atol=1e-5)


def test_steering_edit_on_padded_latents():
    latents = SparseLatents(torch.tensor([[3.0, 2.0, 0.0], [1.0, 0.0, 0.0]]), torch.tensor([[4, 9, -1], [9, -1, -1]]))
    edited = _Steering({9: 5.0}, "clamp", 10)(None, latents)
    dense = edited.to_dense(10)
    assert dense[:, 9].tolist() == [5.0, 5.0] and dense[0, 4] == 3.0 and float(dense.sum()) == 13.0
    added = _Steering({9: 5.0, 0: 1.0}, "add", 10)(None, latents).to_dense(10)
    assert added[:, 9].tolist() == [7.0, 6.0] and added[:, 0].tolist() == [1.0, 1.0]


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("error_term", [True, False])
def test_steering_changes_generated_tokens(gpt2, mode, error_term):
    prompt = torch.randint(1, 64, (2, 5))
    options = {"attention_mask": torch.ones_like(prompt), "max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    sae = random_sae()
    with GRAD_MODES[mode]():
        plain = gpt2.generate(prompt, **options)
        with steer(gpt2, "transformer.h.1", sae, {3: 25.0}, error_term=error_term) as steered:
            changed = gpt2.generate(prompt, **options)
        after = gpt2.generate(prompt, **options)
    assert not torch.equal(plain[:, 5:], changed[:, 5:])
    assert torch.equal(changed[:, :5], prompt)
    assert torch.equal(after, plain)  # the hooks left with the context
    assert not steered.active and hooks_of(gpt2) == {}


def test_steering_with_the_error_term_acts_on_an_exactly_reconstructing_sae(gpt2, tokens):
    """Where the SAE reconstructs perfectly, the error term is 0, and steering must still act."""
    sae = identity_sae()
    with torch.no_grad():
        clean = gpt2(tokens).logits
        with steer(gpt2, "transformer.h.1", sae, {0: 4.0}, error_term=True):
            steered = gpt2(tokens).logits
    assert not torch.allclose(steered, clean, atol=1e-3)


# ------------------------------------------------------------------------------------ exceptions


@pytest.mark.parametrize("kind", ["capture", "splice", "steer", "ablate"])
def test_hooks_are_gone_after_an_exception(gpt2, tokens, kind):
    sae = random_sae()
    make = {
        "capture": lambda: capture(gpt2, ["transformer.h.*"], saes={"transformer.h.1": sae}),
        "splice": lambda: splice(gpt2, {"transformer.h.1": sae, "transformer.h.2": sae}),
        "steer": lambda: steer(gpt2, "transformer.h.1", sae, {3: 5.0}),
        "ablate": lambda: ablate(gpt2, "transformer.h.*"),
    }[kind]
    with torch.no_grad():
        clean = gpt2(tokens).logits
        with pytest.raises(KeyError, match="boom"), make():
            gpt2(tokens)
            assert hooks_of(gpt2)  # the hooks are in place inside
            raise KeyError("boom")
        assert hooks_of(gpt2) == {}
        assert torch.equal(gpt2(tokens).logits, clean)
        # an exception raised inside a hook (a width mismatch) removes them too
        too_narrow = flashsae.TopKSAE(7, 16, 2)
        message = r"transformer\.h\.1 gives activations of shape \[3, 9, 24\].*d_in=7"
        with pytest.raises(ValueError, match=message), splice(gpt2, {"transformer.h.1": too_narrow}):
            gpt2(tokens)
        assert hooks_of(gpt2) == {}


def test_a_context_cannot_be_entered_twice_at_once(gpt2):
    context = ablate(gpt2, "transformer.h.0")
    with context, pytest.raises(RuntimeError, match="already open"), context:
        pass
    assert hooks_of(gpt2) == {}
    with context:  # after it closed, it opens again
        assert context.active


def test_hooks_on_an_encoder_model():
    bert = tiny_bert()
    ids = torch.randint(5, 64, (2, 7))
    with torch.inference_mode():
        reference = bert(ids, output_hidden_states=True).hidden_states
        with capture(bert, "bert.encoder.layer.1") as acts:  # the base model prefix is optional
            pooled = bert(ids).last_hidden_state
        with splice(bert, {"encoder.layer.0": identity_sae(16)}):
            through_identity = bert(ids).last_hidden_state
    torch.testing.assert_close(acts["bert.encoder.layer.1"], reference[2], rtol=0, atol=0)
    torch.testing.assert_close(through_identity, pooled, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------ bad inputs


def test_bad_inputs_name_the_argument(gpt2):
    sae = random_sae()
    cases = [
        (lambda: capture("model", "h.0"), TypeError, r"model: expected a torch\.nn\.Module"),
        (lambda: capture(gpt2, "transformer.h.9"), ValueError, r"'transformer\.h\.9' matches no module"),
        (lambda: capture(gpt2, [3]), TypeError, r"hookpoints: expected module paths"),
        (lambda: capture(gpt2, "h.0", saes={"h.0": nn.Linear(2, 2)}), TypeError, r"saes\['h\.0'\]: expected a"),
        (lambda: capture(gpt2, "h.0", stop=1), TypeError, r"stop: expected True or False"),
        (lambda: splice(gpt2, {}), ValueError, r"saes: expected a non-empty mapping"),
        (lambda: splice(gpt2, {"h.*": sae}), ValueError, r"saes: 'h\.\*' matches 3 modules"),
        (lambda: splice(gpt2, {3: sae}), TypeError, r"saes: keys are hookpoints or"),
        (lambda: splice(gpt2, {"h.0": sae}, error_term=None), TypeError, r"error_term: expected True or False"),
        (lambda: splice(gpt2, {"h.0": sae}, edit=3), TypeError, r"edit: expected a callable"),
        (lambda: splice(gpt2, {"h.0": sae}, mask=torch.ones(3, 9)), TypeError, r"mask: expected a bool tensor"),
        (
            lambda: splice(gpt2, {"h.0": sae, "transformer.h.0": sae}),
            ValueError,
            r"saes: more than one SAE replaces the output of transformer\.h\.0",
        ),
        (lambda: steer(gpt2, "h.0", sae, {96: 1.0}), ValueError, r"latents: latent ids are ints in \[0, 96\)"),
        (lambda: steer(gpt2, "h.0", sae, {1: float("nan")}), ValueError, r"latents: the value of latent 1 must be"),
        (lambda: steer(gpt2, "h.0", sae, {}), ValueError, r"latents: expected a non-empty mapping"),
        (lambda: steer(gpt2, "h.0", sae, {1: 1.0}, mode="set"), ValueError, r"mode: expected one of add, clamp"),
        (lambda: steer(gpt2, "h.0", "sae", {1: 1.0}), TypeError, r"sae: expected a flashsae SAE"),
    ]
    for make, error, message in cases:
        with pytest.raises(error, match=message):
            make()
    mask = torch.ones(3, 9, dtype=torch.bool)
    with (
        pytest.raises(ValueError, match=r"mask: expected shape \[2, 4\].*got \[3, 9\]"),  # checked per forward
        torch.no_grad(),
        splice(gpt2, {"h.0": sae}, mask=mask),
    ):
        gpt2(torch.randint(1, 64, (2, 4)))
    assert hooks_of(gpt2) == {}


def test_output_containers():
    from dataclasses import dataclass

    @dataclass
    class Out:
        hidden: torch.Tensor
        extra: int = 1

    x, y = torch.zeros(2, 3), torch.ones(2, 3)
    replaced = replace_output(Out(x, 5), y)
    assert isinstance(replaced, Out) and replaced.hidden is y and replaced.extra == 5
    assert replace_output([x, 4], y) == [y, 4] and replace_output((x, None), y) == (y, None)
    with pytest.raises(TypeError, match=r"output: cannot replace the activation inside a dict"):
        replace_output({"a": x}, y)

    class Silent(nn.Module):
        def forward(self, x):
            return None

    model = nn.Sequential(Silent())
    message = r"hookpoints: 0 returns NoneType, which holds no activation tensor"
    with pytest.raises(ValueError, match=message), capture(model, "0"):
        model(x)
    assert hooks_of(model) == {}
