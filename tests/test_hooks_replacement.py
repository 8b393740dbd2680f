"""flashsae.hooks.replacement: a cross-layer transcoder (or a crosscoder) spliced into a running model
at all its sites. Checked against a dense plain-torch reference (float64 encoders and decoders as
hooks of their own) on a tiny random GPT-2 and on the demo model (all-MiniLM-L6-v2, bundled);
each encoder runs once per forward; the error term keeps the output bit for bit and sends gradients
through the features only; mask, skip, JumpReLU, hooks removed, bad inputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import flashsae
from flashsae.hooks import capture, replacement
from flashsae.hookpoints import output_tensor, replace_output, resolve_hookpoints

GPT2_IN, GPT2_OUT = "transformer.h.*.ln_2", "transformer.h.*.mlp"
BERT_IN, BERT_OUT = "encoder.layer.*.attention.output", "encoder.layer.*.output.dense"


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=64, n_embd=24, n_layer=3, n_head=2, n_positions=32, initializer_range=0.2)
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def gpt2():
    return tiny_gpt2()


@pytest.fixture(scope="module")
def minilm():
    from transformers import AutoModel

    from flashsae.model_loading import model_location

    return AutoModel.from_pretrained(model_location("all-MiniLM-L6-v2")).eval()


def random_clt(L: int, d: int, n: int = 40, k: int = 4, seed: int = 1, **options) -> flashsae.CrossLayerTranscoder:
    torch.manual_seed(seed)
    clt = flashsae.create("clt", n_layers=L, d_in=d, n_latents=n, k=k, **options)
    with torch.no_grad():
        for i in range(L):
            clt.decoder(i).normal_(std=0.3 / k**0.5)
            getattr(clt, f"b_dec_{i}").normal_(std=0.05)
            getattr(clt, f"b_enc_{i}").normal_(std=0.1)
            if clt.config.skip:
                getattr(clt, f"W_skip_{i}").normal_(std=0.05)
    return clt.eval()


def dense_latents(clt, x: torch.Tensor, i: int) -> torch.Tensor:
    """Layer i's latents as a dense float64 [..., n] tensor, in plain torch."""
    W, b = (t.double() for t in clt.encoder(i))
    pre = x.double() @ W.T + b
    if clt.activation == "topk":
        values, indices = pre.relu().topk(clt.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, indices, values)
    threshold = clt.threshold(i).double() if clt.activation == "jumprelu" else torch.zeros_like(b)
    return torch.where(pre > threshold, pre, 0.0)


class DenseCLTSplice:
    """The reference: plain hooks that keep each layer's dense latents and write
    b_dec_j + sum_{i <= j} f_i W_dec_i[:, j - i] (+ x_j W_skip_j^T) at target j, in float64."""

    def __init__(self, model, clt, inputs, targets, error_term=False, mask=None):
        self.model, self.clt, self.error_term, self.mask = model, clt, error_term, mask
        self.inputs, self.targets = resolve_hookpoints(model, [inputs]), resolve_hookpoints(model, [targets])
        self.f, self.x, self.handles = {}, {}, []

    def __enter__(self):
        modules = dict(self.model.named_modules())
        for i, path in enumerate(self.inputs):
            self.handles.append(modules[path].register_forward_hook(self._read(i)))
        for j, path in enumerate(self.targets):
            self.handles.append(modules[path].register_forward_hook(self._write(j)))
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()

    def _read(self, i):
        def hook(_m, _i, output):
            self.x[i] = output_tensor(output)
            self.f[i] = dense_latents(self.clt, self.x[i], i)

        return hook

    def _write(self, j):
        def hook(_m, _i, output):
            y = output_tensor(output)
            total = getattr(self.clt, f"b_dec_{j}").double()
            cross = self.clt.config.cross_layer  # a per-layer transcoder set: layer j writes j only
            for i in range(j + 1) if cross else (j,):
                total = total + self.f[i] @ self.clt.decoder(i)[:, j - i if cross else 0].double()
            if self.clt.config.skip:
                total = total + self.x[j].double() @ getattr(self.clt, f"W_skip_{j}").double().T
            new = total.to(y.dtype)
            if self.mask is not None:
                new = torch.where(self.mask.unsqueeze(-1), new, y)
            return replace_output(output, new)

        return hook


def final(output) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output.last_hidden_state


@pytest.mark.parametrize(
    "options",
    [{}, {"skip": True}, {"activation": "jumprelu"}, {"activation": "relu"}, {"cross_layer": False}],
    ids=["topk", "skip", "jumprelu", "relu", "transcoder-set"],
)
def test_clt_replacement_matches_a_dense_reference_on_a_tiny_gpt2(gpt2, options):
    clt = random_clt(3, 24, **options)
    if clt.activation == "jumprelu":
        with torch.no_grad():  # trainable thresholds are parameters
            for i in range(3):
                clt.threshold(i).fill_(0.3)
    tokens = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        clean = gpt2(tokens).logits
        with DenseCLTSplice(gpt2, clt, GPT2_IN, GPT2_OUT):
            expected = gpt2(tokens).logits
        with replacement(gpt2, clt, GPT2_IN, GPT2_OUT) as replaced:
            got = replaced(tokens).logits
            latents = replaced.latents
    assert (expected - clean).abs().max() > 1e-2  # the splice changes the model's output
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert len(latents) == 3 and latents[0].values.shape[:2] == (2, 7)
    active = [int(((v > 0) & (i >= 0)).sum()) for v, i in latents]
    assert all(a > 0 for a in active)


def test_clt_replacement_matches_a_dense_reference_on_minilm(minilm):
    from transformers import AutoTokenizer

    from flashsae.model_loading import model_location

    tokenizer = AutoTokenizer.from_pretrained(model_location("all-MiniLM-L6-v2"))
    batch = tokenizer(["Sparse features of a language model.", "def f(x): return x"], padding=True,
                      return_tensors="pt")  # fmt: skip
    clt = random_clt(6, 384, n=64, k=8)
    keep = batch["attention_mask"].bool()
    with torch.no_grad():
        with DenseCLTSplice(minilm, clt, BERT_IN, BERT_OUT, mask=keep):
            expected = minilm(**batch).last_hidden_state
        with replacement(minilm, clt, BERT_IN, BERT_OUT, mask=keep) as replaced:
            got = replaced(**batch).last_hidden_state
        clean = minilm(**batch).last_hidden_state
    assert (expected - clean).abs().max() > 1e-2
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_each_encoder_runs_once_per_forward(gpt2):
    clt = random_clt(3, 24)
    calls = []
    encode_layer = clt.encode_layer
    clt.encode_layer = lambda x, i: calls.append(i) or encode_layer(x, i)
    tokens = torch.randint(0, 64, (2, 5))
    with torch.no_grad(), replacement(gpt2, clt, GPT2_IN, GPT2_OUT) as replaced:
        replaced(tokens)
        gpt2(tokens)  # the model called directly inside the context is spliced too
    assert calls == [0, 1, 2, 0, 1, 2]


def test_error_term_keeps_the_output_and_sends_gradients_through_the_features(gpt2):
    clt = random_clt(3, 24)
    tokens = torch.randint(0, 64, (2, 6))
    with torch.no_grad():
        clean = gpt2(tokens).logits
    with replacement(gpt2, clt, GPT2_IN, GPT2_OUT, error_term=True) as replaced:
        logits = replaced(tokens).logits
    assert torch.equal(logits, clean)
    logits.square().sum().backward()
    mlp = gpt2.transformer.h[1].mlp.c_fc.weight
    # no gradient through the MLPs (their error nodes are constants); it flows through the CLT's
    # decoders and encoders, and through the encoders to the model below them
    assert mlp.grad is None or not bool(mlp.grad.any())
    assert bool(clt.W_dec_0.grad.any()) and bool(clt.W_enc_1.grad.any())
    assert bool(gpt2.transformer.wte.weight.grad.any())
    gpt2.zero_grad(set_to_none=True)
    clt.zero_grad(set_to_none=True)


def random_crosscoder(S: int, d: int, n: int = 48, k: int = 5) -> flashsae.Crosscoder:
    torch.manual_seed(2)
    cc = flashsae.create("crosscoder", n_sites=S, d_in=d, n_latents=n, k=k)
    with torch.no_grad():
        cc.W_dec.mul_(0.5)
        cc.b_enc.normal_(std=0.1)
    return cc.eval()


def test_crosscoder_replacement_writes_each_site_from_the_clean_sites(gpt2):
    cc = random_crosscoder(2, 24)
    sites = ["transformer.h.0", "transformer.h.2"]
    tokens = torch.randint(0, 64, (2, 6))
    with torch.no_grad():
        with capture(gpt2, sites) as acts:
            gpt2(tokens)
        x = torch.cat([acts[s] for s in sites], dim=-1).double()
        pre = x @ cc.W_enc.double().T + cc.b_enc.double()
        values, indices = pre.relu().topk(cc.k, dim=-1)
        f = torch.zeros_like(pre).scatter(-1, indices, values)
        recon = (f @ cc.W_dec.double() + cc.b_dec.double()).view(2, 6, 2, 24).float()
        modules = dict(gpt2.named_modules())
        handles = [
            modules[path].register_forward_hook(lambda _m, _i, out, s=s: replace_output(out, recon[:, :, s]))
            for s, path in enumerate(sites)
        ]
        expected = gpt2(tokens).logits
        for handle in handles:
            handle.remove()
        with replacement(gpt2, cc, sites) as replaced:
            got = replaced(tokens).logits
            with pytest.raises(RuntimeError, match="a crosscoder reads every site before it writes the first"):
                gpt2(tokens)
        with replacement(gpt2, cc, sites, error_term=True) as replaced:
            kept = replaced(tokens).logits
        clean = gpt2(tokens).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert (expected - clean).abs().max() > 1e-2
    assert torch.equal(kept, clean)
    assert replaced.latents.values.shape == (2, 6, cc.k)


def hooks_of(model: nn.Module) -> int:
    return sum(
        1
        for module in model.modules()
        for hook in module._forward_hooks.values()
        if getattr(hook, "__module__", "").startswith("flashsae.")
    )


def test_hooks_are_removed_and_order_is_checked(gpt2):
    clt = random_clt(3, 24)
    tokens = torch.randint(0, 64, (2, 5))
    with pytest.raises(ZeroDivisionError), replacement(gpt2, clt, GPT2_IN, GPT2_OUT) as replaced:
        replaced(tokens)
        raise ZeroDivisionError
    assert hooks_of(gpt2) == 0
    # targets before their inputs: layer 0's target (its ln_1) runs before layer 0's input (ln_2)
    with (
        pytest.raises(RuntimeError, match=r"transformer\.h\.0\.ln_1 ran before transformer\.h\.0\.ln_2"),
        replacement(gpt2, clt, GPT2_IN, "transformer.h.*.ln_1") as replaced,
    ):
        replaced(tokens)
    assert hooks_of(gpt2) == 0
    with pytest.raises(RuntimeError, match="inside its with block"):
        replacement(gpt2, clt, GPT2_IN, GPT2_OUT)(tokens)


def test_bad_arguments_name_themselves(gpt2):
    clt = random_clt(3, 24)
    with pytest.raises(TypeError, match="sae: replacement splices a clt or a crosscoder"):
        replacement(gpt2, flashsae.TopKSAE(24, 48, 4), GPT2_IN, GPT2_OUT)
    with pytest.raises(TypeError, match="sae: expected a flashsae SAE"):
        replacement(gpt2, nn.Linear(2, 2), GPT2_IN, GPT2_OUT)
    with pytest.raises(ValueError, match="inputs: name 2 modules"):
        replacement(gpt2, clt, ["transformer.h.0.ln_2", "transformer.h.1.ln_2"], GPT2_OUT)
    with pytest.raises(ValueError, match="targets: a clt needs"):
        replacement(gpt2, clt, GPT2_IN)
    with pytest.raises(ValueError, match="targets: name 1 modules"):
        replacement(gpt2, clt, GPT2_IN, "transformer.h.0.mlp")
    with pytest.raises(ValueError, match="inputs: expected a module path"):
        replacement(gpt2, clt, [], GPT2_OUT)
    with pytest.raises(ValueError, match="hookpoints: 'nope.*' matches no module"):
        replacement(gpt2, clt, "nope.*", GPT2_OUT)
    with pytest.raises(ValueError, match="targets: a crosscoder writes the sites it reads"):
        replacement(gpt2, random_crosscoder(3, 24), GPT2_IN, GPT2_OUT)
    with pytest.raises(TypeError, match="error_term: expected True or False"):
        replacement(gpt2, clt, GPT2_IN, GPT2_OUT, error_term=1)
    wide = random_clt(3, 16)
    with pytest.raises(ValueError, match=r"inputs: transformer\.h\.0\.ln_2 gives activations of shape \[2, 5, 24\]"):
        with torch.no_grad(), replacement(gpt2, wide, GPT2_IN, GPT2_OUT) as replaced:
            replaced(torch.randint(0, 64, (2, 5)))
    assert hooks_of(gpt2) == 0


def test_encode_layer_and_decode_layer_agree_with_the_clt(gpt2):
    clt = random_clt(3, 24, skip=True)
    x = torch.randn(5, 3, 24)
    with torch.no_grad():
        stacked = clt.encode(x)
        y_hat = clt.decode(stacked, x)
        parts = [clt.decode_layer(clt.encode_layer(x[:, i], i), i) for i in range(3)]
    for i in range(3):
        layer = clt.encode_layer(x[:, i], i)
        assert torch.equal(layer.indices, stacked.indices[:, i]) and torch.equal(layer.values, stacked.values[:, i])
        assert parts[i].shape == (5, 3 - i, 24)
    for j in range(3):
        total = getattr(clt, f"b_dec_{j}") + sum(parts[i][:, j - i] for i in range(j + 1))
        total = total + x[:, j] @ getattr(clt, f"W_skip_{j}").T
        torch.testing.assert_close(total, y_hat[:, j].detach(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"i: expected a layer in \[0, 3\)"):
        clt.encode_layer(x[:, 0], 3)
    with pytest.raises(ValueError, match=r"x_i: expected shape \[\.\.\., d_in=24\]"):
        clt.encode_layer(torch.randn(5, 7), 0)
