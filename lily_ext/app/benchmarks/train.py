"""Train-step time of a tiny Llama: base only, PEFT LoRA, PEFT Lily and lily_ext Lily, side by side.

    lily-ext bench train   (or: python benchmarks/bench_train.py) [--quick]

One step = forward with labels + backward + AdamW step + zero_grad, on batch 4 x 128 tokens,
8 layers, hidden 512, q/v targets. Variants run in interleaved rounds; the table gives the
best and median step time, the adapter overhead (step - base step, from the best times) and the
checkpoint size relative to the trainable parameters' bytes.
"""

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import peft
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lily_ext

LILY = dict(r=32, stride_A=2, num_B=4, target_modules=["q_proj", "v_proj"])


def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=2048,
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(config)


def make_variants(base):
    variants = {"base only": copy.deepcopy(base)}
    for p in variants["base only"].parameters():  # train something cheap so AdamW has work: the norms
        p.requires_grad_("norm" in str(p.shape) or p.dim() == 1)
    variants["PEFT LoRA r32"] = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=32, target_modules=["q_proj", "v_proj"])
    )
    variants["PEFT Lily"] = peft.get_peft_model(copy.deepcopy(base), peft.LilyConfig(**LILY))
    variants["lily_ext Lily"] = lily_ext.get_lily_model(copy.deepcopy(base), lily_ext.LilyConfig(**LILY))
    return variants


def checkpoint_ratio(name, model):
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    with tempfile.TemporaryDirectory() as tmp:
        if name == "lily_ext Lily":
            model.save_adapter(Path(tmp) / "a")
            size = (Path(tmp) / "a" / "adapter.safetensors").stat().st_size
        elif name.startswith("PEFT"):
            model.save_pretrained(tmp)
            size = (Path(tmp) / "adapter_model.safetensors").stat().st_size
        else:
            return None, trainable
    return size / trainable, trainable


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    rounds = 3 if args.quick else 12
    base = tiny_llama()
    variants = make_variants(base)
    ids = torch.randint(0, 2048, (4, 128), generator=torch.Generator().manual_seed(1))
    steps = {}
    for name, model in variants.items():
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step(model=model, optimizer=optimizer):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        for _ in range(2):
            step()
        steps[name] = step
    times = {name: [] for name in variants}
    for _ in range(rounds):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append((time.perf_counter() - t0) * 1e3)
    best = {n: min(t) for n, t in times.items()}
    print(
        f"torch {torch.__version__}, peft {peft.__version__}, {torch.get_num_threads()} threads; tiny Llama 8 x 512, batch 4 x 128; "
        f"Lily r={LILY['r']} stride_A={LILY['stride_A']} num_B={LILY['num_B']} on q/v; {rounds} interleaved rounds"
    )
    print()
    print(
        "| variant | best step ms | median step ms | adapter overhead ms | trainable params | checkpoint / trainable bytes |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for name, model in variants.items():
        ratio, trainable = checkpoint_ratio(name, model)
        overhead = best[name] - best["base only"]
        print(
            f"| {name} | {best[name]:.1f} | {statistics.median(times[name]):.1f} | "
            f"{'-' if name == 'base only' else f'{overhead:.1f}'} | {trainable // 4:,} | {'-' if ratio is None else f'{ratio:.3f}'} |"
        )
    ours = best["lily_ext Lily"] - best["base only"]
    theirs = best["PEFT Lily"] - best["base only"]
    print()
    print(f"lily_ext adapter overhead / PEFT Lily adapter overhead = {ours / theirs:.2f}")


if __name__ == "__main__":
    main()
