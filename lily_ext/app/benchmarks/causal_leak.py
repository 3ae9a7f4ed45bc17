"""Which routing modes are causal: future-token leak and KV-cache exactness on a tiny decoder.

    lily-ext bench causal_leak   [--quick] [--new-tokens 8]

A tiny LlamaForCausalLM (built from a config, random weights) with Lily on q_proj / v_proj
(r=4, num_B=3, init_weights=False). Per routing mode, a markdown table of:

- the largest change of the logits at positions 0..L-2 when only the last token of the prompt
  changes (0 for a causal mode: no position sees a later token);
- the largest |score difference| between ``generate(use_cache=True)`` and ``use_cache=False``
  (greedy, ``--new-tokens`` new tokens), and whether they chose the same tokens.
"""

import argparse
import warnings

import torch

MODES = ("batch", "sequence", "token", "static", "causal")


def build(routing, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    from lily_ext import LilyConfig, get_lily_model

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    base = LlamaForCausalLM(config).eval()
    base.generation_config.eos_token_id = None  # fixed lengths: every step is compared
    base.generation_config.pad_token_id = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # batch / sequence on a decoder warn: that is what is measured
        model = get_lily_model(
            base, LilyConfig(r=4, num_B=3, target_modules=["q_proj", "v_proj"], routing=routing, init_weights=False)
        )
    return model.eval()


@torch.no_grad()
def measure(routing, new_tokens, batch=2, length=12):
    model = build(routing)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (batch, length), generator=g)
    other = ids.clone()
    other[:, -1] = (other[:, -1] + 1) % 97
    leak = (model(input_ids=ids).logits[:, :-1] - model(input_ids=other).logits[:, :-1]).abs().max().item()
    runs = {}
    for use_cache in (True, False):
        runs[use_cache] = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            do_sample=False,
            use_cache=use_cache,
            output_scores=True,
            return_dict_in_generate=True,
        )
    score_diff = max((a - b).abs().max().item() for a, b in zip(runs[True].scores, runs[False].scores))
    same_tokens = torch.equal(runs[True].sequences, runs[False].sequences)
    return leak, score_diff, same_tokens


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="(accepted for `lily-ext bench`; this run is short)")
    parser.add_argument("--new-tokens", type=int, default=8)
    args = parser.parse_args(argv)
    print(
        "| routing | max change of earlier logits (last token changed) | max abs score diff, cache vs no cache "
        f"(greedy, {args.new_tokens} tokens) | same tokens |"
    )
    print("|---|---|---|---|")
    for routing in MODES:
        leak, score_diff, same = measure(routing, args.new_tokens)
        print(f"| `{routing}` | {leak:.2e} | {score_diff:.2e} | {'yes' if same else 'no'} |")


if __name__ == "__main__":
    main()
