"""flashsae.eval.evaluate: every metric against a float64 reference computed from the captured
activations (several batches, a cut last batch, padded latents, a transcoder); CE loss recovered
and KL arithmetic on a tiny randomly initialized GPT-2 against the model's own loss; the pooled
embedding fidelity of an encoder; special tokens left out; the top-activating examples against a
brute force; bad settings."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import flashsae
from flashsae.eval import EvalConfig, evaluate
from flashsae.eval.examples import TopExamples
from flashsae.hooks import capture, splice
from flashsae.outputs import SparseLatents
from test_hooks import D, identity_sae, random_sae, tiny_gpt2

HOOK = "transformer.h.1.mlp"  # returns a plain tensor in every transformers version


@pytest.fixture(scope="module")
def gpt2():
    return tiny_gpt2(seed=1)


@pytest.fixture
def ids():
    return torch.randint(1, 64, (7, 12))


def _reference_activations(model, ids, hookpoints):
    with torch.no_grad(), capture(model, hookpoints) as acts:
        model(ids)
    return [acts[h].reshape(-1, acts[h].shape[-1]) for h in hookpoints]


@torch.no_grad()
def _reference_metrics(x, target, sae, n_tokens, dense_threshold=0.1):
    """The module docstring's definitions, in float64, on [N, d] rows."""
    x, target = x[:n_tokens], target[:n_tokens]
    latents = sae.encode(x)
    args = (latents, x) if isinstance(sae, flashsae.Transcoder) else (latents,)
    recon = sae.decode(*args).double()
    y = target.double()
    dense = latents.to_dense(sae.n_latents).double()
    density = (dense > 0).double().mean(0)
    sse = (y - recon).pow(2).sum()
    norm_in, norm_out = y.norm(dim=-1), recon.norm(dim=-1)
    return {
        "mse": float(sse / y.numel()),
        "fvu": float(sse / (y - y.mean(0)).pow(2).sum()),
        "explained_variance": float(1 - sse / (y - y.mean(0)).pow(2).sum()),
        "cossim": float(F.cosine_similarity(y, recon, dim=-1).mean()),
        "l0": float((dense > 0).sum(-1).double().mean()),
        "l1": float(dense.sum(-1).mean()),
        "l2_norm_in": float(norm_in.mean()),
        "l2_norm_out": float(norm_out.mean()),
        "shrinkage": float((norm_out / norm_in).mean()),
        "relative_reconstruction_bias": float(recon.pow(2).sum() / (y * recon).sum()),
        "dead_fraction": float((density == 0).double().mean()),
        "dense_fraction": float((density > dense_threshold).double().mean()),
    }, density


@pytest.mark.parametrize("architecture", ["topk", "batchtopk", "jumprelu", "matryoshka"])
def test_metrics_match_the_float64_definitions(gpt2, ids, architecture):
    sae = random_sae(architecture=architecture)
    n_tokens = 7 * 12 - 5  # the last batch is cut mid-way
    result = evaluate(sae, gpt2, "h.1", ids, n_tokens, batch_size=3, downstream="none", histogram_bins=16)
    (x,) = _reference_activations(gpt2, ids, ["transformer.h.1"])
    expected, density = _reference_metrics(x, x, sae, n_tokens)
    assert result.tokens == n_tokens and result.hookpoint == "transformer.h.1" and result.downstream == "none"
    for name, value in expected.items():
        assert result.metrics[name] == pytest.approx(value, rel=1e-5, abs=1e-9), name
    torch.testing.assert_close(result.density, density, rtol=0, atol=1e-12)
    histogram = result.histogram
    assert histogram.dead == int((density == 0).sum()) and sum(histogram.counts) + histogram.dead == sae.n_latents
    alive = density[density > 0].log10()
    for low, high, count in zip(histogram.edges[:-1], histogram.edges[1:], histogram.counts, strict=True):
        inside = (alive >= low - 1e-9) & ((alive < high - 1e-9) | (high == histogram.edges[-1]))
        assert count == int(inside.sum())
    assert histogram.edges[0] <= math.log10(1 / n_tokens) and histogram.edges[-1] == 0


def test_transcoder_metrics_are_against_the_target(gpt2, ids):
    transcoder = flashsae.Transcoder(D, 80, 6, skip=True)
    with torch.no_grad():
        transcoder.W_dec.normal_(std=0.3)
        transcoder.W_skip.normal_(std=0.1)
    result = evaluate(transcoder, gpt2, "transformer.h.1.ln_2", ids, 60, target_hookpoint=HOOK, batch_size=2)
    x, y = _reference_activations(gpt2, ids, ["transformer.h.1.ln_2", HOOK])
    expected, _ = _reference_metrics(x, y, transcoder, 60)
    assert result.target_hookpoint == HOOK and result.architecture == "transcoder"
    for name, value in expected.items():
        assert result.metrics[name] == pytest.approx(value, rel=1e-5, abs=1e-9), name
    assert {"ce_clean", "ce_spliced", "ce_loss_recovered"} <= set(result.metrics)


def _zero_hook(_module, _inputs, output):
    return torch.zeros_like(output)


def _kl(clean_logits, other_logits):
    log_p, log_q = F.log_softmax(clean_logits.double(), -1), F.log_softmax(other_logits.double(), -1)
    return float((log_p.exp() * (log_p - log_q)).sum(-1).mean())


def test_ce_loss_recovered_arithmetic_on_a_tiny_random_gpt2(gpt2, ids):
    """Against the model's own loss (labels=ids) with the SAE spliced by hand and the hookpoint
    zeroed by a plain forward hook: every token is evaluated (no padding, no special tokens)."""
    sae = random_sae(n=96, k=8)
    result = evaluate(sae, gpt2, HOOK, ids, ids.numel(), batch_size=7)
    assert result.downstream == "causal_lm" and result.tokens == ids.numel()
    with torch.no_grad():
        clean = gpt2(ids, labels=ids)
        with splice(gpt2, {HOOK: sae}):
            spliced = gpt2(ids, labels=ids)
        handle = gpt2.transformer.h[1].mlp.register_forward_hook(_zero_hook)
        try:
            ablated = gpt2(ids, labels=ids)
        finally:
            handle.remove()
    ce_clean, ce_spliced, ce_ablation = float(clean.loss), float(spliced.loss), float(ablated.loss)
    assert ce_ablation - ce_clean > 0.05, "the test needs a hookpoint whose ablation hurts"
    metrics = result.metrics
    assert metrics["ce_clean"] == pytest.approx(ce_clean, rel=1e-5)
    assert metrics["ce_spliced"] == pytest.approx(ce_spliced, rel=1e-5)
    assert metrics["ce_ablation"] == pytest.approx(ce_ablation, rel=1e-5)
    recovered = (ce_ablation - ce_spliced) / (ce_ablation - ce_clean)
    assert metrics["ce_loss_recovered"] == pytest.approx(recovered, rel=1e-4, abs=1e-5)
    # a difference of two float32 losses of ~4.2, each from batches of 7 rows here and of all rows in
    # the reference: the GEMMs round differently by batch shape (and CPU: 1.07e-6 apart on an EPYC,
    # within 1e-6 on the Xeon), a few ulps of each loss
    ulp = torch.finfo(torch.float32).eps * ce_clean
    assert metrics["ce_loss_increase"] == pytest.approx(ce_spliced - ce_clean, rel=1e-4, abs=8 * ulp)
    kl_spliced, kl_ablation = _kl(clean.logits, spliced.logits), _kl(clean.logits, ablated.logits)
    assert metrics["kl_spliced"] == pytest.approx(kl_spliced, rel=1e-4, abs=1e-7)
    assert metrics["kl_ablation"] == pytest.approx(kl_ablation, rel=1e-4, abs=1e-7)
    assert metrics["kl_recovered"] == pytest.approx((kl_ablation - kl_spliced) / kl_ablation, rel=1e-4, abs=1e-6)


def test_ce_loss_recovered_bounds(gpt2, ids):
    """An exact SAE recovers everything; an SAE that outputs zeros recovers nothing."""
    exact = evaluate(identity_sae(), gpt2, HOOK, ids, ids.numel(), batch_size=4).metrics
    assert exact["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-5)
    assert exact["kl_spliced"] == pytest.approx(0.0, abs=1e-7) and exact["kl_recovered"] == pytest.approx(1.0)
    assert exact["explained_variance"] == pytest.approx(1.0, abs=1e-6)
    zero = flashsae.TopKSAE(D, 32, 4)
    with torch.no_grad():
        zero.W_dec.zero_()  # b_dec is 0 too: the reconstruction is exactly the zero ablation
    nothing = evaluate(zero, gpt2, HOOK, ids, ids.numel(), batch_size=4).metrics
    assert nothing["ce_spliced"] == pytest.approx(nothing["ce_ablation"], rel=1e-6)
    assert nothing["ce_loss_recovered"] == pytest.approx(0.0, abs=1e-5)
    assert nothing["kl_recovered"] == pytest.approx(0.0, abs=1e-5)


def test_downstream_none_stops_after_the_hookpoint(gpt2, ids):
    calls = []
    handle = gpt2.transformer.h[2].register_forward_hook(lambda *_: calls.append(1))
    try:
        sae = random_sae()
        stopped = evaluate(sae, gpt2, "h.1", ids, 50, downstream="none")
        assert calls == []
        full = evaluate(sae, gpt2, "h.1", ids, 50)
    finally:
        handle.remove()
    assert calls, "the downstream forwards ran every layer"
    assert "ce_clean" not in stopped.metrics and "ce_clean" in full.metrics
    for name, value in stopped.metrics.items():
        assert full.metrics[name] == pytest.approx(value, rel=1e-9, abs=1e-12), name


def test_token_data_forms_agree(gpt2, ids):
    sae = random_sae()
    as_tensor = evaluate(sae, gpt2, HOOK, ids, 70, batch_size=3)
    batches = [{"input_ids": ids[i : i + 2]} for i in range(0, 7, 2)]
    as_batches = evaluate(sae, gpt2, HOOK, batches, 70)
    assert as_tensor.tokens == as_batches.tokens == 70
    for name, value in as_tensor.metrics.items():
        assert as_batches.metrics[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name  # float32 forwards


def test_encoder_embedding_fidelity_and_special_tokens():
    """Text through a tokenizer: [CLS]/[SEP] are left out of metrics and splice; the pooled
    embedding cosine matches a hand-made splice at the content tokens only."""
    from transformers import AutoModel, AutoTokenizer

    from train_helpers import TEXTS
    from train_helpers import tiny_bert as tiny_bert_dir

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir())
    bert = AutoModel.from_pretrained(tiny_bert_dir()).eval()
    sae = random_sae(d=32)
    result = evaluate(sae, bert, "encoder.layer.1", TEXTS, 10_000, tokenizer=tokenizer, ctx_len=16, batch_size=4)
    assert result.downstream == "embedding"
    # the reference: the same contexts, packed by the trainer's packer
    from flashsae.train.text import ContextPacker, DocumentSource, Tokenization

    tokenization = Tokenization(tokenizer)
    packer = ContextPacker(DocumentSource("t", lambda s: iter(TEXTS[s:])), tokenization, 16, cycle=False)
    contexts = []
    while (batch := packer.next_contexts(100)) is not None:
        contexts.append(batch)
    input_ids = torch.cat([c[0] for c in contexts])
    attention = torch.cat([c[1] for c in contexts])
    keep = attention.bool() & ~torch.isin(input_ids, tokenization.special_ids)
    assert result.tokens == int(keep.sum()) and result.tokens < int(attention.sum())

    def splice_content(_module, _inputs, output):
        out = output if isinstance(output, torch.Tensor) else output[0]
        new = torch.where(keep.unsqueeze(-1), sae.decode(sae.encode(out)), out)
        return new if isinstance(output, torch.Tensor) else (new, *output[1:])

    with torch.no_grad():
        clean = bert(input_ids, attention_mask=attention).last_hidden_state.double()
        handle = bert.encoder.layer[1].register_forward_hook(splice_content)
        try:
            spliced = bert(input_ids, attention_mask=attention).last_hidden_state.double()
        finally:
            handle.remove()
    weights = attention.double().unsqueeze(-1)
    pooled_clean = (clean * weights).sum(1) / weights.sum(1)
    pooled_spliced = (spliced * weights).sum(1) / weights.sum(1)
    rows = keep.any(-1)
    expected = F.cosine_similarity(pooled_clean[rows], pooled_spliced[rows], dim=-1).mean()
    assert result.metrics["embedding_cosine"] == pytest.approx(float(expected), rel=1e-5)
    assert result.metrics["embedding_cosine_ablation"] < result.metrics["embedding_cosine"] < 1
    exact = evaluate(identity_sae(32), bert, "encoder.layer.1", TEXTS, 100, tokenizer=tokenizer, ctx_len=16)
    assert exact.metrics["embedding_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert exact.metrics["embedding_cosine_recovered"] == pytest.approx(1.0, abs=1e-5)
    assert exact.tokens == 100 < result.tokens  # cut inside a batch


@pytest.mark.parametrize("per_latent", [1, 3])
def test_top_examples_match_a_brute_force(per_latent):
    n = 13
    collector = TopExamples(n, per_latent, torch.device("cpu"))
    all_values, all_tokens = [], []
    for _ in range(4):
        rows, slots = 9, 4
        input_ids = torch.randint(0, 50, (3, 3))
        offset = collector.add_batch(input_ids, torch.ones_like(input_ids))
        values = torch.randint(0, 4, (rows, slots)).float()  # small integers: many exact ties
        indices = torch.stack([torch.randperm(n)[:slots] for _ in range(rows)]).int()  # distinct in a row
        indices[torch.rand(rows, slots) < 0.2] = -1  # padded slots
        values[indices < 0] = 0
        token_ids = offset + torch.arange(rows)
        collector.update(SparseLatents(values, indices), token_ids)
        dense = torch.zeros(rows, n)
        for r in range(rows):
            for s in range(slots):
                if indices[r, s] >= 0:
                    dense[r, indices[r, s]] = values[r, s]
        all_values.append(dense)
        all_tokens.append(token_ids)
    dense = torch.cat(all_values)
    tokens = torch.cat(all_tokens)
    for latent in range(n):
        fired = [(float(dense[r, latent]), int(tokens[r])) for r in range(len(tokens)) if dense[r, latent] > 0]
        fired.sort(key=lambda pair: (-pair[0], pair[1]))  # best first, ties: the earlier token
        best = fired[:per_latent]
        got = [
            (v, t)
            for v, t in zip(collector.values[latent].tolist(), collector.tokens[latent].tolist(), strict=True)
            if t >= 0
        ]
        assert got == best, latent


def test_examples_are_token_windows_with_the_token_highlighted(gpt2, ids):
    result = evaluate(
        random_sae(), gpt2, "h.1", ids, 60, downstream="none", top_latents=4, examples_per_latent=2,
        latent_selection="busiest",
    )  # fmt: skip
    assert len(result.latents) == 4 and {latent.group for latent in result.latents} == {"busiest"}
    densities = [latent.density for latent in result.latents]
    assert densities == sorted(densities, reverse=True)
    assert densities[0] == pytest.approx(float(result.density.max()))
    for latent in result.latents:
        assert 1 <= len(latent.examples) <= 2 and latent.max_activation == latent.examples[0].activation
        for example in latent.examples:
            assert 0 <= example.highlight < len(example.tokens) and example.activation > 0
            assert all(token.startswith("#") for token in example.tokens)  # no tokenizer: token ids
    record = result.to_dict()
    assert record["latents"][0]["examples"][0]["tokens"] == result.latents[0].examples[0].tokens
    assert "density" not in record and len(result.to_dict(density=True)["density"]) == 96


def test_bad_settings_name_the_argument(gpt2, ids):
    sae = random_sae()
    cases = [
        (dict(n_tokens=0), ValueError, r"n_tokens: expected a positive int"),
        (dict(batch_size=0), ValueError, r"batch_size: expected a positive int"),
        (dict(downstream="lm"), ValueError, r"downstream: expected one of auto, causal_lm, embedding, none"),
        (dict(dense_threshold=1.5), ValueError, r"dense_threshold: expected a number in \(0, 1\)"),
        (dict(top_latents=-1), ValueError, r"top_latents: expected an int >= 0"),
        (dict(latent_selection="top"), ValueError, r"latent_selection: expected one of spread, busiest"),
        (dict(part="test"), ValueError, r"split: expected one of train, eval, all"),
        (dict(eval_fraction=1.5), ValueError, r"eval_fraction: expected a number in \[0, 1\)"),
        (dict(target_hookpoint=""), ValueError, r"target_hookpoint: expected a module path"),
    ]
    for options, error, message in cases:
        with pytest.raises(error, match=message):
            EvalConfig(**options)
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'n_token'"):
        evaluate(sae, gpt2, "h.1", ids, n_token=5)
    with pytest.raises(ValueError, match=r"tokenizer: needed to tokenize the texts"):
        evaluate(sae, gpt2, "h.1", ["some text"], 10, ctx_len=16)
    with pytest.raises(ValueError, match=r"ctx_len: 128 is more than the 32 positions the model takes"):
        evaluate(sae, gpt2, "h.1", ["some text"], 10, ctx_len=128)
    with pytest.raises(ValueError, match=r"downstream: 'embedding' needs the model's last hidden state"):
        evaluate(sae, gpt2, "h.1", ids, 10, downstream="embedding")
    with pytest.raises(TypeError, match=r"data: expected a dataset name or path"):
        evaluate(sae, gpt2, "h.1", 3.5, 10)
    with pytest.raises(ValueError, match=r"hookpoint: 'transformer\.h\.\*' matches 3 modules"):
        evaluate(sae, gpt2, "transformer.h.*", ids, 10)
    with pytest.raises(TypeError, match=r"sae: expected a flashsae SAE"):
        evaluate(gpt2, gpt2, "h.1", ids, 10)
    with pytest.raises(ValueError, match=r"data: yields no tokens to evaluate"):
        evaluate(sae, gpt2, "h.1", [], 10)
    with pytest.raises(ValueError, match=r"target_hookpoint: the SAE predicts width 24, but transformer\.wte"):
        evaluate(sae, WideTarget(), "h.1", ids, 10, target_hookpoint="transformer.wte", downstream="none")
    assert sae.training is False and gpt2.training is False


class WideTarget(torch.nn.Module):
    """A plain module: h.1 gives width 24 (the SAE's), transformer.wte gives width 30."""

    def __init__(self) -> None:
        super().__init__()
        self.transformer = torch.nn.Module()
        self.transformer.wte = torch.nn.Embedding(64, 30)
        self.h = torch.nn.ModuleList([torch.nn.Linear(30, D), torch.nn.Linear(D, D)])

    def forward(self, input_ids, attention_mask=None):
        return self.h[1](self.h[0](self.transformer.wte(input_ids)))


def test_token_texts_join_into_the_decoded_window():
    from transformers import AutoTokenizer

    from flashsae.eval.examples import token_texts
    from flashsae.model_loading import model_location
    from train_helpers import tiny_gpt2 as tiny_gpt2_dir

    text = "The quick brown foxes, jumping; def __init__(self): déjà vu 😀"
    wordpiece = AutoTokenizer.from_pretrained(model_location("all-MiniLM-L6-v2"))  # the demo's, bundled
    ids = wordpiece(text, add_special_tokens=False)["input_ids"]
    pieces = token_texts(wordpiece, ids)
    assert "".join(pieces) == wordpiece.decode(ids, clean_up_tokenization_spaces=False)
    assert pieces[:3] == ["the", " quick", " brown"]  # one at a time they would read 'thequickbrown'
    byte_level = AutoTokenizer.from_pretrained(tiny_gpt2_dir())
    ids = byte_level(text, add_special_tokens=False)["input_ids"]
    pieces = token_texts(byte_level, ids)
    assert len(pieces) == len(ids) and "é" in pieces and "😀" in pieces  # completed by their last byte
    assert "".join(pieces).replace("\ufffd", "") == byte_level.decode(ids)
    assert token_texts(None, [5, 7]) == ["#5", "#7"]
