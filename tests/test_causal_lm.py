"""Lily on causal language models: causal routing, KV-cache generation equal to the forward pass.

routing="causal" mixes token t with the running mean of its sample's router probabilities up to t;
its decoding state travels with the generation's KV cache (lily_ext/causal.py). token and static
routing are causal without state. batch and sequence routing leak future tokens (and warn).
"""

import copy
import threading
import warnings

import pytest
import torch
from helpers.lily_models import lily_lm
from helpers.models import tiny_bert, tiny_llama, token_batch
from helpers.reference import routed_mix_reference
from transformers import DynamicCache

import lily_ext
from lily_ext import LilyConfig, NonCausalRoutingWarning, get_lily_model
from lily_ext.causal import CausalStateError

CAUSAL_MODES = ["causal", "token", "static"]
ATOL = 1e-5


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one intra-op thread is fastest, and immune to a busy machine's oversubscription."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def generate(model, ids, mode, use_cache, mask=None, new=5):
    kwargs = {"max_new_tokens": new, "use_cache": use_cache, "return_dict_in_generate": True, "output_scores": True}
    if mode == "greedy":
        kwargs.update(do_sample=False, output_logits=True)
    elif mode == "sample":
        kwargs.update(do_sample=True, top_k=0, top_p=1.0, temperature=1.0, output_logits=True)
        torch.manual_seed(1234)
    else:  # beam search
        kwargs.update(do_sample=False, num_beams=3, length_penalty=1.0)
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids) if mask is None else mask, **kwargs)


# ---- no future token reaches an earlier position ----------------------------------------------------------------


@pytest.mark.parametrize("routing", CAUSAL_MODES)
def test_changing_the_last_token_leaves_earlier_logits_unchanged(routing):
    model = lily_lm("llama", routing)
    ids = token_batch(2, 10)
    other = ids.clone()
    other[:, -1] = (other[:, -1] + 7) % 97
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, model(input_ids=other).logits
    assert (a[:, :-1] - b[:, :-1]).abs().max() <= 1e-6
    assert (a[:, -1] - b[:, -1]).abs().max() > 1e-3


@pytest.mark.parametrize("routing", ["batch", "sequence"])
def test_batch_and_sequence_routing_leak_future_tokens(routing):
    model = lily_lm("llama", routing)
    ids = token_batch(2, 10)
    other = ids.clone()
    other[:, -1] = (other[:, -1] + 7) % 97
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, model(input_ids=other).logits
    assert (a[:, :-1] - b[:, :-1]).abs().max() > 1e-4


def test_causal_layer_matches_the_float64_reference_while_decoding():
    """One adapted layer's outputs over prefill + token-by-token decoding (left padding) = the float64 formula."""
    model = lily_lm("llama").double()
    path, layer = model.lily_layers()[1]
    ids = token_batch(2, 9, seed=3)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    seen = []
    hook = layer.register_forward_hook(lambda m, args, out: seen.append((args[0].detach(), out.detach())))
    try:
        with torch.no_grad():
            out = model(input_ids=ids[:, :4], attention_mask=mask[:, :4], use_cache=True)
            for t in range(4, 9):
                out = model(input_ids=ids[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=out.cache)
    finally:
        hook.remove()
    x = torch.cat([s[0] for s in seen], dim=1)
    y = torch.cat([s[1] for s in seen], dim=1)
    h = x @ layer.lily_A["default"].weight.T
    expected = layer.base_layer(x) + routed_mix_reference(
        h, layer.lily_router["default"].weight, layer.bank("default"), layer.scaling["default"], "causal", mask
    )
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-10)
    # zero delta before the first unmasked token
    torch.testing.assert_close(y[0, :3], layer.base_layer(x[0, :3]), rtol=0, atol=1e-12)


# ---- generate(use_cache=True) = generate(use_cache=False) = one forward pass ------------------------------------


def _transition_log_probs(model, result, prompt):
    """log p(chosen token) per generated step, from one forward pass over the final sequences."""
    with torch.no_grad():
        logits = model(input_ids=result.sequences).logits[:, prompt - 1 : -1]
    chosen = result.sequences[:, prompt:]
    return torch.log_softmax(logits, dim=-1).gather(-1, chosen[..., None])[..., 0], logits


@pytest.mark.parametrize("mode", ["greedy", "sample", "beam"])
@pytest.mark.parametrize(
    "arch,routing", [("llama", r) for r in CAUSAL_MODES] + [("qwen2", "causal")]
)  # token / static keep no state: one architecture is enough for them
def test_cached_generation_equals_uncached_and_the_forward_pass(arch, routing, mode):
    model = lily_lm(arch, routing)
    ids = token_batch(2, 7, seed=5)
    cached, uncached = generate(model, ids, mode, True), generate(model, ids, mode, False)
    assert torch.equal(cached.sequences, uncached.sequences)
    for a, b in zip(cached.scores, uncached.scores):
        torch.testing.assert_close(a, b, rtol=0, atol=ATOL)
    log_probs, logits = _transition_log_probs(model, cached, ids.shape[1])
    if mode == "beam":
        torch.testing.assert_close(cached.sequences_scores, uncached.sequences_scores, rtol=0, atol=ATOL)
        steps = model.compute_transition_scores(cached.sequences, cached.scores, cached.beam_indices)
        torch.testing.assert_close(steps, log_probs, rtol=0, atol=ATOL)
    else:
        for a, b in zip(cached.logits, uncached.logits):
            torch.testing.assert_close(a, b, rtol=0, atol=ATOL)
        torch.testing.assert_close(torch.stack(cached.logits, dim=1), logits, rtol=0, atol=ATOL)


@pytest.mark.parametrize(
    "operation,rows",
    [
        ("reorder_cache", [2, 0, 0]),  # beam search
        ("batch_select_indices", [1, 2]),
        ("batch_repeat_interleave", [0, 0, 1, 1, 2, 2]),
    ],
)
def test_the_causal_state_follows_the_cache_batch_operations(operation, rows):
    model = lily_lm("llama")
    ids = token_batch(3, 7, seed=8)
    with torch.no_grad():
        cache = model(input_ids=ids[:, :5], use_cache=True).cache
        argument = 2 if operation == "batch_repeat_interleave" else torch.tensor(rows)
        getattr(cache, operation)(argument)
        rows = torch.tensor(rows)
        mask = torch.ones(len(rows), 6, dtype=torch.long)
        got = model(input_ids=ids[rows, 5:6], cache=cache, attention_mask=mask).logits
    torch.testing.assert_close(got, _forward(model, ids[rows, :6])[:, 5:], rtol=0, atol=ATOL)


@pytest.mark.parametrize("mode", ["greedy", "beam"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_left_padded_batch_gives_each_sample_what_it_gets_alone(arch, mode):
    model = lily_lm(arch)
    prompts = [token_batch(1, 5, seed=11)[0], token_batch(1, 8, seed=12)[0]]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :], mask[i, width - len(p) :] = p, 1
    batch = generate(model, ids, mode, True, mask=mask)
    for i, p in enumerate(prompts):
        alone = generate(model, p[None], mode, True)
        assert torch.equal(batch.sequences[i, width:], alone.sequences[0, len(p) :])
        if mode == "greedy":
            for a, b in zip(batch.logits, alone.logits):
                torch.testing.assert_close(a[i], b[0], rtol=0, atol=ATOL)
        else:
            torch.testing.assert_close(batch.sequences_scores[i], alone.sequences_scores[0], rtol=0, atol=ATOL)


# ---- the state travels with the cache -------------------------------------------------------------------------


def _decode(model, ids, steps, cache=None):
    """A user's decoding loop: prefill, then one greedy token at a time with an explicit cache. Returns logits."""
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True) if cache is None else model(input_ids=ids, cache=cache)
        logits = [out.logits]
        seq = ids
        for _ in range(steps):
            nxt = out.logits[:, -1:].argmax(-1)
            seq = torch.cat([seq, nxt], dim=1)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # transformers renamed past_key_values to cache
                out = model(input_ids=nxt, past_key_values=out.past_key_values, attention_mask=torch.ones_like(seq))
            logits.append(out.logits)
    return seq, torch.cat(logits, dim=1)


def _forward(model, seq):
    with torch.no_grad():
        return model(input_ids=seq).logits


def test_user_decoding_loop_with_explicit_past_key_values():
    model = lily_lm("llama")
    seq, logits = _decode(model, token_batch(2, 5), steps=5)
    torch.testing.assert_close(logits, _forward(model, seq), rtol=0, atol=ATOL)


def test_interleaved_generations_and_models_do_not_disturb_each_other():
    model, other = lily_lm("llama", seed=0), lily_lm("llama", seed=5)
    a_ids, b_ids = token_batch(2, 5, seed=1), token_batch(3, 4, seed=2)
    expected = {}
    for name, (m, ids) in {"a": (model, a_ids), "b": (model, b_ids), "c": (other, a_ids)}.items():
        expected[name] = _decode(m, ids, steps=4)
    # the same three decodings, one step of each in turn (two caches on one model, and another model)
    with torch.no_grad():
        outs = {"a": model(input_ids=a_ids, use_cache=True), "b": model(input_ids=b_ids, use_cache=True)}
        outs["c"] = other(input_ids=a_ids, use_cache=True)
        seqs = {"a": a_ids, "b": b_ids, "c": a_ids}
        logits = {k: [o.logits] for k, o in outs.items()}
        for _ in range(4):
            for k, m in (("a", model), ("b", model), ("c", other)):
                nxt = outs[k].logits[:, -1:].argmax(-1)
                seqs[k] = torch.cat([seqs[k], nxt], dim=1)
                outs[k] = m(input_ids=nxt, cache=outs[k].cache, attention_mask=torch.ones_like(seqs[k]))
                logits[k].append(outs[k].logits)
    for k, (seq, ref) in expected.items():
        assert torch.equal(seqs[k], seq)
        torch.testing.assert_close(torch.cat(logits[k], dim=1), ref, rtol=0, atol=0)
        torch.testing.assert_close(ref, _forward(other if k == "c" else model, seq), rtol=0, atol=ATOL)


def test_concurrent_generate_in_threads():
    model = lily_lm("llama")
    inputs = [token_batch(1, 4 + i, seed=20 + i) for i in range(3)]
    expected = [generate(model, ids, "greedy", True).sequences for ids in inputs]
    results, errors = [None] * len(inputs), []

    def run(i):
        try:
            for _ in range(2):
                results[i] = generate(model, inputs[i], "greedy", True).sequences
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for got, want in zip(results, expected):
        assert torch.equal(got, want)


def test_a_copied_cache_branches_independently():
    model = lily_lm("llama")
    ids = token_batch(1, 6, seed=4)
    with torch.no_grad():
        out = model(input_ids=ids[:, :4], use_cache=True)
        branch = copy.deepcopy(out.cache)
        first = model(input_ids=ids[:, 4:], cache=out.cache).logits
        second = model(input_ids=ids[:, 4:], cache=branch).logits
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    torch.testing.assert_close(first, _forward(model, ids)[:, 4:], rtol=0, atol=ATOL)


def test_an_empty_cache_passed_in_and_a_reset_cache_start_fresh():
    model = lily_lm("llama")
    ids = token_batch(2, 6)
    cache = DynamicCache()
    with torch.no_grad():
        first = model(input_ids=ids, cache=cache).logits
        cache.reset()
        again = model(input_ids=ids, cache=cache).logits
    torch.testing.assert_close(first, _forward(model, ids), rtol=0, atol=ATOL)
    torch.testing.assert_close(again, first, rtol=0, atol=0)


# ---- what cannot work raises ---------------------------------------------------------------------------------


def test_a_cache_from_another_model_is_refused():
    model, other = lily_lm("llama", seed=0), lily_lm("llama", seed=3)
    ids = token_batch(2, 5)
    with torch.no_grad():
        cache = model(input_ids=ids, use_cache=True).cache
        with pytest.raises(CausalStateError, match="another LilyModel"):
            other(input_ids=ids[:, :1], cache=cache)


def test_a_cache_without_causal_state_is_refused():
    model = lily_lm("llama")
    ids = token_batch(2, 5)
    with torch.no_grad():
        with model.disable_adapter():  # the base model fills the cache: no routing state
            cache = model(input_ids=ids, use_cache=True).cache
        with pytest.raises(CausalStateError, match="holds 5 past tokens but no causal routing state"):
            model(input_ids=ids[:, :1], cache=cache)
        cache = model(input_ids=ids, use_cache=True).cache
        with model.disable_adapter():  # the cache grows without the adapter: the state falls behind
            model(input_ids=ids[:, :1], cache=cache)
        with pytest.raises(CausalStateError, match="holds 6 tokens but its causal routing state covers 5"):
            model(input_ids=ids[:, :1], cache=cache)


def test_cropping_a_causal_cache_is_refused():
    model = lily_lm("llama")
    with torch.no_grad():
        cache = model(input_ids=token_batch(1, 5), use_cache=True).cache
    with pytest.raises(CausalStateError, match=r"routing='causal': cannot crop"):
        cache.crop(-2)
    assert cache.get_seq_length() == 5  # refused before anything changed
    cache.crop(0)  # a no-op stays allowed


def test_a_different_batch_size_is_refused():
    model = lily_lm("llama")
    with torch.no_grad():
        cache = model(input_ids=token_batch(2, 5), use_cache=True).cache
        with pytest.raises(CausalStateError, match="holds 2 samples but this call has 3"):
            model(input_ids=token_batch(3, 1), cache=cache)


# ---- warnings, checkpoints, PEFT, CLI ---------------------------------------------------------------------------


@pytest.mark.parametrize("routing", ["batch", "sequence"])
def test_non_causal_routing_on_a_decoder_warns_once(routing):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        get_lily_model(tiny_llama(layers=2, hidden=32), LilyConfig(r=4, target_modules=["q_proj"], routing=routing))
    lily = [w for w in caught if issubclass(w.category, NonCausalRoutingWarning)]
    assert len(lily) == 1
    assert issubclass(lily[0].category, UserWarning)
    assert 'routing="causal"' in str(lily[0].message) and "leak" in str(lily[0].message)


@pytest.mark.parametrize(
    "build,routing",
    [(lambda: tiny_llama(layers=2, hidden=32), r) for r in CAUSAL_MODES]
    + [(tiny_bert, "batch"), (tiny_bert, "sequence")],
)
def test_causal_routing_and_encoders_do_not_warn(build, routing):
    targets = ["query"] if routing in ("batch", "sequence") else ["q_proj"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        get_lily_model(build(), LilyConfig(r=4, target_modules=targets, routing=routing))
    assert not [w for w in caught if issubclass(w.category, NonCausalRoutingWarning)]


def test_causal_checkpoint_round_trip(tmp_path):
    model = lily_lm("llama")
    model.save_adapter(tmp_path / "adapter")
    loaded = lily_ext.load_adapter(tiny_llama(layers=2, hidden=32), tmp_path / "adapter")
    assert loaded.configs["default"].routing == "causal"
    ids = token_batch(2, 6)
    torch.testing.assert_close(_forward(loaded, ids), _forward(model, ids), rtol=0, atol=0)


def test_cli_accepts_causal_routing():
    from lily_ext.app.cli import build_parser

    args = build_parser().parse_args(["train", "--model", "m", "--data", "d", "--out", "o", "--routing", "causal"])
    assert args.routing == "causal"
    assert build_parser().parse_args(["bench", "causal_leak"]).which == "causal_leak"


def test_save_peft_adapter_refuses_causal_routing(tmp_path):
    model = lily_lm("llama")
    with pytest.raises(ValueError, match=r"PEFT's Lily has batch routing only; this adapter uses routing='causal'"):
        model.save_peft_adapter(tmp_path / "peft")
    assert not (tmp_path / "peft").exists()


def test_from_peft_with_causal_routing():
    peft = pytest.importorskip("peft")
    base = tiny_llama(layers=2, hidden=32)
    peft_model = peft.get_peft_model(
        base, peft.LilyConfig(r=4, num_B=3, target_modules=["q_proj", "v_proj"], init_weights=False)
    ).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonCausalRoutingWarning)
        as_batch = lily_ext.from_peft(peft_model)
    model = lily_ext.from_peft(peft_model, routing="causal")
    assert model.configs["default"].routing == "causal" and as_batch.configs["default"].routing == "batch"
    for (path, ours), (_, batch) in zip(model.lily_layers(), as_batch.lily_layers()):
        assert torch.equal(ours.lily_router["default"].weight, batch.lily_router["default"].weight), path
    ids = token_batch(2, 8)
    other = ids.clone()
    other[:, -1] = (other[:, -1] + 3) % 97
    with torch.no_grad():
        torch.testing.assert_close(_forward(as_batch, ids), peft_model(input_ids=ids).logits, rtol=0, atol=1e-5)
        a, b = model(input_ids=ids).logits, model(input_ids=other).logits
    assert (a[:, :-1] - b[:, :-1]).abs().max() <= 1e-6  # causal now
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    with pytest.raises(ValueError, match="freeze_router"):
        lily_ext.from_peft(peft_model, routing="static")


def test_torch_compile_fullgraph_of_a_wrapped_model():
    """The per-call context is a ContextVar in eager mode; under torch.compile it must not break the graph."""
    from helpers.lily_models import lily_net

    model = lily_net("causal")
    x, mask = torch.randn(2, 5, 16), torch.ones(2, 5, dtype=torch.long)
    mask[0, :2] = 0
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, attention_mask=mask), model(x, attention_mask=mask))
