"""The whole Lily layer in one op (issue 17): decode and train-step cost on a realistic adapter.

    lily-ext bench fused_layer [--quick]
    python -m lily_ext.app.benchmarks.fused_layer [--quick] [--threads 2] [--configs big,qv]

A Llama-shaped model (8 layers, hidden 512, MLP 1408, 8 heads, vocab 2048, random weights), side
by side in one process, variants interleaved in rounds:

- base (no adapter), PEFT Lily, lily_ext with the fused ``lily::lily_linear`` off (``before``: base
  layer, ``x A^T`` and ``routed_mix`` as separate ops) and on (``after``);
- decode: ms per token with a KV cache after a 32-token prompt, batch 1 and 8 (lily_ext ``token``
  routing, exact with a cache; PEFT's Lily has only its ``batch`` routing);
- train step: batch 4 x 128, forward with labels + backward + AdamW step (both ``batch`` routing),
  AdamW fused as transformers' Trainer runs it by default (``--optim adamw_torch``: torch's
  default per-tensor loop, as the issue's first table ran it);
- adapter cost = variant - base, and lily_ext's cost / PEFT's;
- the adapter's GEMM floor of the train step: every GEMM the adapter's math needs (forward
  ``x A^T``, ``h Bc``; backward ``G Bc^T``, ``h^T G``, ``dh^T x``, ``dh A``) for every adapted layer,
  timed through ``torch.matmul`` (the same BLAS) in the same run, twice: each product warm and
  alone (best of 5), and in the step's order and memory (the base layers' and the adapter's
  GEMMs replayed over per-layer tensors, minus the base layers' alone), per product;
- what any implementation of the adapter pays in a step (those GEMMs in the step's order, and
  AdamW over the adapter's tensors), as a fraction of PEFT's adapter cost: the lowest ratio to
  PEFT the host allows;
- configs: ``big`` = Lily r=128 stride_A=2 num_B=4 on all seven linear targets, ``qv`` = r=32 on
  q/v (the existing train table's adapter);
- one adapted layer (q_proj, gate_proj) at 1 and 8 rows with cold caches, against reading its
  weight, A and bank once (decode's memory floor) and against the fused op's own base pass;
- a profile of where lily_ext's time goes (decode batch 1, and one train step).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import torch

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONFIGS = {
    "big": dict(r=128, stride_A=2, num_B=4, target_modules=ALL),
    "qv": dict(r=32, stride_A=2, num_B=4, target_modules=["q_proj", "v_proj"]),
}
VARIANTS = ("base", "PEFT Lily", "lily_ext before", "lily_ext after")


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=2048,
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=512,
    )
    return LlamaForCausalLM(config)


def build(base, cfg, routing):
    import peft

    import lily_ext

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = lily_ext.get_lily_model(copy.deepcopy(base), lily_ext.LilyConfig(routing=routing, **cfg))
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LilyConfig(**cfg))
    plain = copy.deepcopy(base)
    for p in plain.parameters():  # so AdamW has some work in the base step: the norms
        p.requires_grad_(p.dim() == 1)
    return {"base": plain, "PEFT Lily": theirs, "lily_ext before": ours, "lily_ext after": ours}


def fused_for(name):
    import lily_ext

    return lily_ext.fused_layers(name != "lily_ext before")


def decode_round(model, batch, prompt, steps):
    """ms per generated token of `steps` greedy decode steps after a prefill of `prompt` tokens."""
    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(0, 2048, (batch, prompt), generator=g)
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
        cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        mask = torch.ones(batch, prompt + 1, dtype=torch.long)
        t0 = time.perf_counter()
        for _ in range(steps):
            out = model(input_ids=nxt, past_key_values=cache, attention_mask=mask, use_cache=True)
            cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
            mask = torch.cat([mask, mask[:, :1]], dim=1)
        return (time.perf_counter() - t0) / steps * 1e3


def bench_decode(models, batch, rounds, steps):
    times = {n: [] for n in models}
    for name, model in models.items():
        model.eval()
        with fused_for(name):
            decode_round(model, batch, 32, 2)
    for _ in range(rounds):
        for name, model in models.items():
            with fused_for(name):
                times[name].append(decode_round(model, batch, 32, steps))
    return times


def train_rounds(rounds):
    """Rounds of train steps: a step is one sample, where a decode round averages its tokens."""
    return 2 * rounds + 1


def train_batch():
    """The train step's batch: 4 x 128 token ids."""
    return torch.randint(0, 2048, (4, 128), generator=torch.Generator().manual_seed(1))


# --optim: the names transformers' TrainingArguments gives them; the first is its default.
OPTIMIZERS = ("adamw_torch_fused", "adamw_torch")


def adamw(model, optim, lr=1e-4):
    """AdamW over the model's trainable tensors (the base model's: its norms): the one lily_ext's
    training builds (fused), or torch's default loop."""
    from lily_ext.optim import adamw as fused_where_possible

    build = fused_where_possible if optim == "adamw_torch_fused" else torch.optim.AdamW
    return build([p for p in model.parameters() if p.requires_grad], lr=lr)


def make_step(model, ids, optim):
    optimizer = adamw(model, optim)

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def bench_train(models, rounds, ids, optim):
    steps = {}
    for name, model in models.items():
        model.train()
        if name == "lily_ext after":  # the same model and optimizer as "before"
            steps[name] = steps["lily_ext before"]
            continue
        steps[name] = make_step(model, ids, optim)
    for name in models:
        with fused_for(name):
            for _ in range(2):
                steps[name]()
    times = {n: [] for n in models}
    for _ in range(rounds):
        for name in models:
            with fused_for(name):
                t0 = time.perf_counter()
                steps[name]()
                times[name].append((time.perf_counter() - t0) * 1e3)
    for model in models.values():
        model.eval()
    return times


def _best_ms(fn, repeat):
    fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


# The adapter's GEMMs per layer in a train step (batch routing), as the floor times them.
PRODUCTS = ("x A^T", "h Bc", "G Bc^T", "h^T G", "dh^T x", "dh A")


def gemm_floor(model, tokens, repeat):
    """ms of the GEMMs a train step's adapters need, summed over the adapted layers (batch routing),
    each product warm and alone (best of `repeat`): {product: ms}."""
    shapes = {}
    for _, layer in model.lily_layers():
        name = layer.active_adapter
        r, n_in, n_out = layer.r[name], layer.in_features, layer.out_features
        key = (r, n_in, n_out)
        shapes[key] = shapes.get(key, 0) + 1
    total = dict.fromkeys(PRODUCTS, 0.0)
    g = torch.Generator().manual_seed(0)
    for (r, n_in, n_out), count in shapes.items():
        x = torch.randn(tokens, n_in, generator=g)
        A = torch.randn(r, n_in, generator=g)
        h = torch.randn(tokens, r, generator=g)
        Bc = torch.randn(r, n_out, generator=g)
        G = torch.randn(tokens, n_out, generator=g)
        dh = torch.randn(tokens, r, generator=g)
        products = {
            "x A^T": lambda: torch.matmul(x, A.T),  # h = x A^T
            "h Bc": lambda: torch.matmul(h, Bc),  # delta = h Bc
            "G Bc^T": lambda: torch.matmul(G, Bc.T),  # dh = G Bc^T
            "h^T G": lambda: torch.matmul(h.T, G),  # dBc = h^T G
            "dh^T x": lambda: torch.matmul(dh.T, x),  # dA = dh^T x
            "dh A": lambda: torch.matmul(dh, A),  # dx += dh A
        }
        for label, product in products.items():
            total[label] += count * _best_ms(product, repeat)
    return total


def gemm_floor_in_sequence(model, ids, rounds):
    """The same GEMMs timed in a train step's order and memory: the model's adapted layers in the
    order one forward calls them (layers called one after another on the same input share it, as
    q/k/v and gate/up do), with their real base weights and fresh per-layer activations and
    gradients; forward over all layers, then backward in reverse. Timed with and without the
    adapter's six products per layer, interleaved; the floor is the difference of the medians, so
    every product pays the cache misses and packing of cold operands that the step's GEMMs pay, and
    nothing else. Returns (floor ms, the base layers' GEMMs ms, {product: median ms in the rounds})."""
    calls = []
    hooks = [
        layer.register_forward_pre_hook(lambda mod, args: calls.append((mod, args[0])))  # keeps each input alive
        for _, layer in model.lily_layers()
    ]
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        for hook in hooks:
            hook.remove()
    tokens, g = ids.numel(), torch.Generator().manual_seed(0)
    layers, previous = [], None  # previous: (the last call's input, its stand-in)
    for layer, given in calls:
        name = layer.active_adapter
        r, n_in, n_out = layer.r[name], layer.in_features, layer.out_features
        shared = previous is not None and previous[0] is given
        x = previous[1] if shared else torch.randn(tokens, n_in, generator=g)
        previous = (given, x)
        layers.append(
            dict(
                x=x,
                W=layer.base_layer.weight.detach(),
                A=torch.randn(r, n_in, generator=g),
                Bc=torch.randn(r, n_out, generator=g),
                G=torch.randn(tokens, n_out, generator=g),
            )
        )

    def replay(adapter, spent):
        def timed(label, product):
            t0 = time.perf_counter()
            result = product()
            spent[label] += (time.perf_counter() - t0) * 1e3
            return result

        hidden = []
        for L in layers:
            y = torch.matmul(L["x"], L["W"].T)
            if adapter:
                hidden.append(timed("x A^T", lambda: torch.matmul(L["x"], L["A"].T)))
                timed("h Bc", lambda: y.addmm_(hidden[-1], L["Bc"]))  # y += h Bc
        for L in reversed(layers):
            dx = torch.matmul(L["G"], L["W"])
            if adapter:
                h = hidden.pop()
                dh = timed("G Bc^T", lambda: torch.matmul(L["G"], L["Bc"].T))
                timed("h^T G", lambda: torch.matmul(h.T, L["G"]))  # dBc
                timed("dh^T x", lambda: torch.matmul(dh.T, L["x"]))  # dA
                timed("dh A", lambda: dx.addmm_(dh, L["A"]))  # dx += dh A

    times = {False: [], True: []}
    per_product = {label: [] for label in PRODUCTS}
    for adapter in (True, False):
        replay(adapter, dict.fromkeys(PRODUCTS, 0.0))
    for _ in range(rounds):
        for adapter in (False, True):
            spent = dict.fromkeys(PRODUCTS, 0.0)
            t0 = time.perf_counter()
            replay(adapter, spent)
            times[adapter].append((time.perf_counter() - t0) * 1e3)
            if adapter:
                for label, ms in spent.items():
                    per_product[label].append(ms)
    base = statistics.median(times[False])
    products = {label: statistics.median(ms) for label, ms in per_product.items()}
    return statistics.median(times[True]) - base, base, products


def optimizer_ms(model, name, ids, optim, repeat=7):
    """Median ms of one AdamW step over the model's trainable tensors (lr 0: the weights stay as they
    are), gradients from one train step: work every implementation of the same adapter pays."""
    model.train()
    optimizer = adamw(model, optim, lr=0.0)
    with fused_for(name):
        model(input_ids=ids, labels=ids).loss.backward()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        optimizer.step()
        times.append((time.perf_counter() - t0) * 1e3)
    optimizer.zero_grad(set_to_none=True)
    model.eval()
    return statistics.median(times)


def _layer(model, suffix):
    return next(m for name, m in model.named_modules() if name.endswith(suffix))


def cold_layers(models, repeat):
    """Decode is a pass over weights that do not stay in cache: one adapted layer's forward at 1 and
    8 rows with the caches flushed before every call (a 64 MiB write). Up to 8 rows lily_ext's op
    reads the base weight in the same passes as the adapter, so its adapter cost is given twice:
    against nn.Linear (what a user saves) and against the op's own base pass (the same op with a
    rank-1 adapter: what the adapter itself adds); the floor is reading W, A and the bank once."""
    from lily_ext.ops import lily_linear

    flush = torch.zeros(16 << 20)
    print("\nOne layer, cold caches (a 64 MiB write before every call), median us, no grad:\n")
    print(
        "| layer | rows | nn.Linear | PEFT layer | lily_ext layer | lily_ext base pass | read W + A + bank | "
        "PEFT adapter | lily_ext adapter vs nn.Linear / vs its base pass | lily_ext layer / read |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for suffix in ("layers.3.self_attn.q_proj", "layers.3.mlp.gate_proj"):
        base = _layer(models["base"], suffix)
        theirs = _layer(models["PEFT Lily"], suffix)
        ours = _layer(models["lily_ext after"], suffix)
        if not hasattr(ours, "lily_A"):  # not a target of this config
            continue
        name = ours.active_adapter
        A, bank = ours.lily_A[name].weight, ours.lily_B[name].weight
        # the op with a rank-1, two-expert static adapter: its base pass and a negligible mix
        A1, theta1, bank1 = torch.zeros(1, base.in_features), torch.zeros(2), torch.zeros(2, base.out_features)
        for rows in (1, 8):
            x = torch.randn(rows, 1, base.in_features, generator=torch.Generator().manual_seed(rows))
            calls = {
                "base": lambda: base(x),
                "PEFT": lambda: theirs(x),
                "ours": lambda: ours(x),
                "base pass": lambda: lily_linear(x, base.weight, base.bias, A1, theta1, bank1, mode="static"),
                "read": lambda: [t.sum() for t in (base.weight, A, bank)],
            }
            times = {k: [] for k in calls}
            with torch.no_grad(), fused_for("lily_ext after"):
                for _ in range(repeat):
                    for k, call in calls.items():
                        flush.add_(1.0)
                        t0 = time.perf_counter()
                        call()
                        times[k].append((time.perf_counter() - t0) * 1e6)
            med = {k: statistics.median(v) for k, v in times.items()}
            print(
                f"| {suffix.split('.')[-1]} {base.in_features}->{base.out_features} | {rows} | {med['base']:.0f} | "
                f"{med['PEFT']:.0f} | {med['ours']:.0f} | {med['base pass']:.0f} | {med['read']:.0f} | "
                f"{med['PEFT'] - med['base']:.0f} | {med['ours'] - med['base']:.0f} / "
                f"{med['ours'] - med['base pass']:.0f} | {med['ours'] / med['read']:.2f} |"
            )


def profile_summary(model, fn, label, rows=12):
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    print(f"\nprofile, {label}: self CPU time by op (top {rows}), total {total / 1e3:.1f} ms\n")
    print("| op | calls | self ms | share |")
    print("|---|---:|---:|---:|")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:rows]:
        share = e.self_cpu_time_total / total if total else 0.0
        print(f"| {e.key} | {e.count} | {e.self_cpu_time_total / 1e3:.2f} | {share:.1%} |")


def run_config(name, cfg, base, rounds, steps, profile, optim):
    print(
        f"\n### {name}: Lily r={cfg['r']} stride_A={cfg['stride_A']} num_B={cfg['num_B']} on {', '.join(cfg['target_modules'])}\n"
    )
    rows = {}
    decode_models = build(base, cfg, "token")
    for batch in (1, 8):
        times = bench_decode(decode_models, batch, rounds, steps)
        rows[f"decode, ms per token, batch {batch}"] = times
    cold_layers(decode_models, 15 if rounds <= 3 else 40)
    if profile:
        ours = decode_models["lily_ext after"]
        profile_summary(ours, lambda: decode_round(ours, 1, 32, 4), "decode batch 1, lily_ext after (fused)")
    del decode_models
    train_models = build(base, cfg, "batch")
    train_ids = train_batch()
    rows["train step ms (batch 4 x 128)"] = bench_train(train_models, train_rounds(rounds), train_ids, optim)
    alone = gemm_floor(train_models["lily_ext after"], train_ids.numel(), 5)
    floor = sum(alone.values())
    floor_in_step, base_gemms, in_step = gemm_floor_in_sequence(
        train_models["lily_ext after"], train_ids, max(5, rounds)
    )
    adamw = optimizer_ms(train_models["lily_ext after"], "lily_ext after", train_ids, optim)
    adamw_base = optimizer_ms(train_models["base"], "base", train_ids, optim)
    if profile:
        ours = train_models["lily_ext after"]
        ours.train()
        step = make_step(ours, train_ids, optim)
        with fused_for("lily_ext after"):
            step()
            profile_summary(ours, step, "one train step, lily_ext after (fused)")
        ours.eval()
    print()
    print(
        "| | base | PEFT Lily | lily_ext before | lily_ext after | adapter cost PEFT | before | after | "
        "after / PEFT | before / PEFT |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for label, times in rows.items():
        med = {n: statistics.median(t) for n, t in times.items()}
        cost = {n: med[n] - med["base"] for n in VARIANTS}
        print(
            f"| {label} | "
            + " | ".join(f"{med[n]:.2f}" for n in VARIANTS)
            + f" | {cost['PEFT Lily']:.2f} | {cost['lily_ext before']:.2f} | {cost['lily_ext after']:.2f} | "
            f"{cost['lily_ext after'] / cost['PEFT Lily']:.2f} | {cost['lily_ext before'] / cost['PEFT Lily']:.2f} |"
        )
    train = {n: statistics.median(t) for n, t in rows["train step ms (batch 4 x 128)"].items()}
    after = train["lily_ext after"] - train["base"]
    print(
        f"\ntrain step: the adapter's GEMM floor (the six products per adapted layer via torch.matmul), "
        f"each product warm and alone {floor:.1f} ms, in the step's order and memory {floor_in_step:.1f} ms "
        f"(the adapted layers' own base GEMMs in that replay: {base_gemms:.1f} ms); "
        f"lily_ext after's adapter cost / floor = {after / floor:.2f} warm and alone, "
        f"{after / floor_in_step:.2f} in the step's order; medians of the rounds\n"
    )
    shared = floor_in_step + adamw - adamw_base
    print(
        f"what any implementation of this adapter pays in a step: its GEMMs in the step's order "
        f"{floor_in_step:.1f} ms + AdamW on its tensors {adamw - adamw_base:.1f} ms = {shared:.1f} ms, "
        f"{shared / (train['PEFT Lily'] - train['base']):.2f} of PEFT's adapter cost (the lowest after / PEFT "
        f"could be here); lily_ext after's cost beyond it {after - shared:.1f} ms, {after / shared:.2f}x it\n"
    )
    print("| adapter product | warm and alone, ms | in the step's order, ms | ratio |")
    print("|---|---:|---:|---:|")
    for label in PRODUCTS:
        print(f"| {label} | {alone[label]:.1f} | {in_step[label]:.1f} | {in_step[label] / alone[label]:.2f} |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--configs", default="big,qv")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--optim", choices=OPTIMIZERS, default=OPTIMIZERS[0], help="the train step's AdamW")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import peft
    import transformers

    rounds, steps = (3, 8) if args.quick else (7, 16)
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
        f"{torch.get_num_threads()} threads, {args.optim}; Llama 8 layers, hidden 512, MLP 1408, 8 heads, vocab 2048; "
        f"{rounds} interleaved rounds (train steps: {train_rounds(rounds)}), median; decode: {steps} tokens after "
        "a 32-token prompt"
    )
    base = llama()
    for name in args.configs.split(","):
        run_config(
            name, CONFIGS[name], base, rounds, steps, profile=not args.no_profile and name == "big", optim=args.optim
        )


if __name__ == "__main__":
    main()
