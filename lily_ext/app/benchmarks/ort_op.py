"""lily.RoutedMix in ONNX Runtime vs the same math written with standard ONNX ops.

    lily-ext bench ort_op   (or: python benchmarks/bench_ort_op.py) [--threads N] [--quick] [--provider cuda]

``--provider cuda`` runs both graphs on the CUDA execution provider (RoutedMix pinned to it) with
the input and output left in GPU memory (IO binding), so the times are the GPU work plus ORT's
launch overhead, not host copies.

Batch mode, r=128 E=4 out=1024, router and bank stored as initializers (weights), hidden [N, r]
fed per run. The standard-op graph is the decomposed form an exporter emits without the custom
op (no Einsum):

    P = Softmax(MatMul(h, R^T));  w = ReduceMean(P, axis 0)
    Bc = Reshape(MatMul(w[1, E], Reshape(Bk, [E, r*out])), [r, out]);  delta = Mul(MatMul(h, Bc), s)

Prints a markdown table of median microseconds per run (both graphs checked to agree first).

A second table (CPU) is decode-sized: ``token`` routing, r=16 E=3 out=512 (the decoder benchmark's
adapter) at 1 and 8 rows, 64 nodes per graph with weights of their own (6 MiB of banks, as a
decoder's layers have), summed into one output so the per-run overhead is spread over 64 nodes:
microseconds per node, ``RoutedMix`` vs the standard-op form ``MatMul(Reshape(P (x) h), Bk_flat)``.
"""

import argparse
import statistics
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import lily_ext

R, E, OUT, SCALING = 128, 4, 1024, 0.5
IR_VERSION, OPSET = 10, 18


def serialized(graph, custom):
    """The checked model's bytes; custom: it imports the lily domain too."""
    opsets = [helper.make_opsetid("", OPSET)] + ([helper.make_opsetid("lily", 1)] if custom else [])
    model = helper.make_model(graph, opset_imports=opsets, ir_version=IR_VERSION)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def check_agree(standard, custom, feeds, what):
    """Both sessions give the same delta (relative 1e-4) before anything is timed."""
    a, b = standard.run(None, feeds)[0], custom.run(None, feeds)[0]
    err = np.abs(a - b).max() / max(np.abs(a).max(), 1e-30)
    assert err < 1e-4, f"the two graphs disagree at {what}: relative error {err:.2e}"


def graphs(router, bank):
    """(custom-op model, standard-op model) as serialized bytes."""
    h = helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["N", R])
    delta = helper.make_tensor_value_info("delta", TensorProto.FLOAT, ["N", OUT])
    weights = [numpy_helper.from_array(router, "router"), numpy_helper.from_array(bank, "bank")]
    custom = helper.make_graph(
        [
            helper.make_node(
                "RoutedMix", ["hidden", "router", "bank"], ["delta"], domain="lily", mode="batch", scaling=SCALING
            )
        ],
        "lily_custom",
        [h],
        [delta],
        initializer=weights,
    )
    consts = [
        numpy_helper.from_array(np.array([0], np.int64), "axis0"),
        numpy_helper.from_array(np.array([1, E], np.int64), "w_shape"),
        numpy_helper.from_array(np.array([E, R * OUT], np.int64), "bank_flat_shape"),
        numpy_helper.from_array(np.array([R, OUT], np.int64), "comb_shape"),
        numpy_helper.from_array(np.array(SCALING, np.float32), "scaling"),
    ]
    nodes = [
        helper.make_node("Transpose", ["router"], ["router_t"], perm=[1, 0]),
        helper.make_node("MatMul", ["hidden", "router_t"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
        helper.make_node("ReduceMean", ["probs", "axis0"], ["w"], keepdims=0),
        helper.make_node("Reshape", ["w", "w_shape"], ["w_row"]),
        helper.make_node("Reshape", ["bank", "bank_flat_shape"], ["bank_flat"]),
        helper.make_node("MatMul", ["w_row", "bank_flat"], ["comb_flat"]),
        helper.make_node("Reshape", ["comb_flat", "comb_shape"], ["comb"]),
        helper.make_node("MatMul", ["hidden", "comb"], ["mixed"]),
        helper.make_node("Mul", ["mixed", "scaling"], ["delta"]),
    ]
    standard = helper.make_graph(nodes, "lily_standard", [h], [delta], initializer=weights + consts)
    return serialized(custom, True), serialized(standard, False)


def median_us(session, feeds, budget_s, device=False):
    """Median microseconds per run; device: hidden and delta stay in CUDA memory (IO binding)."""
    if device:
        binding = session.io_binding()
        binding.bind_ortvalue_input("hidden", ort.OrtValue.ortvalue_from_numpy(feeds["hidden"], "cuda", 0))
        binding.bind_output("delta", "cuda")

        def run():
            session.run_with_iobinding(binding)  # returns once the EP's stream is done
    else:

        def run():
            session.run(None, feeds)

    for _ in range(3):
        run()
    t0 = time.perf_counter()
    run()
    probe = time.perf_counter() - t0
    samples = []
    for _ in range(int(min(max(budget_s / max(probe, 1e-7), 10), 2000))):
        t0 = time.perf_counter()
        run()
        samples.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(samples)


def cuda_sessions(custom_bytes, standard_bytes):
    """Both graphs on the CUDA EP, or (None, why not)."""
    from lily_ext.ort import library_has_cuda, library_record

    if not library_has_cuda():
        return None, f"liblily_ort_cuda.so was not built: {library_record().get('cuda_reason')}"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return None, f"onnxruntime {ort.__version__} offers no CUDAExecutionProvider"
    pinned = ort.SessionOptions()
    pinned.register_custom_ops_library(lily_ext.ort_library_path(cuda=True))
    pinned.add_session_config_entry("session.disable_cpu_ep_fallback", "1")  # RoutedMix on the GPU or no session
    try:
        custom = ort.InferenceSession(custom_bytes, sess_options=pinned, providers=["CUDAExecutionProvider"])
    except Exception as exc:  # no usable GPU / CUDA EP: ORT says why
        return None, f"no CUDA EP session: {str(exc).strip()[-300:]}"
    standard = ort.InferenceSession(standard_bytes, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    return (custom, standard), None


DECODE_R, DECODE_E, DECODE_OUT, DECODE_NODES = 16, 3, 512, 64


def cpu_sessions(custom_bytes, standard_bytes, threads):
    """The custom-op graph (our library registered) and the standard-op graph on the CPU EP."""
    custom = lily_ext.ort_session(custom_bytes, intra_op_num_threads=threads)
    plain = ort.SessionOptions()
    plain.intra_op_num_threads = threads
    standard = ort.InferenceSession(standard_bytes, sess_options=plain, providers=["CPUExecutionProvider"])
    return custom, standard


def decode_graphs(rows, rng):
    """(custom-op model, standard-op model) of DECODE_NODES token-mode mixes of one hidden, summed."""
    r, E, out, K = DECODE_R, DECODE_E, DECODE_OUT, DECODE_NODES
    h = helper.make_tensor_value_info("hidden", TensorProto.FLOAT, [rows, r])
    total = helper.make_tensor_value_info("delta", TensorProto.FLOAT, [rows, out])
    routers = [rng.standard_normal((E, r), dtype=np.float32) for _ in range(K)]
    banks = [(rng.standard_normal((E, r, out), dtype=np.float32) / r**0.5).astype(np.float32) for _ in range(K)]
    custom_nodes, custom_weights, std_nodes = [], [], []
    std_weights = [
        numpy_helper.from_array(np.array([rows, E, 1], np.int64), "p_shape"),
        numpy_helper.from_array(np.array([rows, 1, r], np.int64), "h_shape"),
        numpy_helper.from_array(np.array([rows, E * r], np.int64), "z_shape"),
        numpy_helper.from_array(np.array(SCALING, np.float32), "scaling"),
    ]
    for k in range(K):
        custom_weights += [
            numpy_helper.from_array(routers[k], f"router_{k}"),
            numpy_helper.from_array(banks[k], f"bank_{k}"),
        ]
        custom_nodes.append(
            helper.make_node(
                "RoutedMix",
                ["hidden", f"router_{k}", f"bank_{k}"],
                [f"delta_{k}"],
                domain="lily",
                mode="token",
                scaling=SCALING,
            )
        )
        std_weights += [
            numpy_helper.from_array(routers[k].T.copy(), f"router_t_{k}"),
            numpy_helper.from_array(banks[k].reshape(E * r, out), f"bank_flat_{k}"),
        ]
        std_nodes += [
            helper.make_node("MatMul", ["hidden", f"router_t_{k}"], [f"logits_{k}"]),
            helper.make_node("Softmax", [f"logits_{k}"], [f"probs_{k}"], axis=-1),
            helper.make_node("Reshape", [f"probs_{k}", "p_shape"], [f"probs3_{k}"]),
            helper.make_node("Mul", [f"probs3_{k}", "h3"], [f"kron3_{k}"]),
            helper.make_node("Reshape", [f"kron3_{k}", "z_shape"], [f"kron_{k}"]),
            helper.make_node("MatMul", [f"kron_{k}", f"bank_flat_{k}"], [f"mixed_{k}"]),
            helper.make_node("Mul", [f"mixed_{k}", "scaling"], [f"delta_{k}"]),
        ]
    std_nodes.insert(0, helper.make_node("Reshape", ["hidden", "h_shape"], ["h3"]))
    summed = helper.make_node("Sum", [f"delta_{k}" for k in range(K)], ["delta"])
    custom = helper.make_graph(custom_nodes + [summed], "lily_decode", [h], [total], initializer=custom_weights)
    standard = helper.make_graph(std_nodes + [summed], "lily_decode", [h], [total], initializer=std_weights)
    return serialized(custom, True), serialized(standard, False)


def decode_table(threads, budget, rng):
    print(
        f"\ndecode-sized, token mode, r={DECODE_R} E={DECODE_E} out={DECODE_OUT}, {DECODE_NODES} nodes per graph "
        f"(weights of their own), intra_op_num_threads={threads or 'default'}; median us per node\n"
    )
    print("| rows | standard ONNX ops us | lily.RoutedMix us | speedup |")
    print("|---:|---:|---:|---:|")
    for rows in (1, 8):
        custom_bytes, standard_bytes = decode_graphs(rows, rng)
        custom, standard = cpu_sessions(custom_bytes, standard_bytes, threads)
        feeds = {"hidden": rng.standard_normal((rows, DECODE_R), dtype=np.float32)}
        check_agree(standard, custom, feeds, f"{rows} rows (decode)")
        t_std, t_custom = [], []
        for _ in range(5):  # alternate, so that a change in the machine's load falls on both
            t_std.append(median_us(standard, feeds, budget / 5))
            t_custom.append(median_us(custom, feeds, budget / 5))
        t_std, t_custom = statistics.median(t_std) / DECODE_NODES, statistics.median(t_custom) / DECODE_NODES
        print(f"| {rows} | {t_std:.1f} | {t_custom:.1f} | {t_std / t_custom:.2f}x |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (0: ORT's default)")
    parser.add_argument("--quick", action="store_true", help="shorter timing budget")
    parser.add_argument("--provider", choices=["cpu", "cuda"], default="cpu", help="execution provider")
    args = parser.parse_args(argv)
    budget = 0.3 if args.quick else 1.5
    rng = np.random.default_rng(0)
    router = rng.standard_normal((E, R), dtype=np.float32)
    bank = (rng.standard_normal((E, R, OUT), dtype=np.float32) / R**0.5).astype(np.float32)
    custom_bytes, standard_bytes = graphs(router, bank)
    device = args.provider == "cuda"
    if device:
        sessions, why_not = cuda_sessions(custom_bytes, standard_bytes)
        if sessions is None:
            print(f"skipped: {why_not}")
            return
        custom, standard = sessions
        where = "CUDA EP (IO binding, data on the GPU)"
    else:
        custom, standard = cpu_sessions(custom_bytes, standard_bytes, args.threads)
        where = f"CPU EP, intra_op_num_threads={args.threads or 'default'}"
    print(f"onnxruntime {ort.__version__}, {where}, batch mode, r={R} E={E} out={OUT}; median us per run")
    print()
    print("| N | standard ONNX ops us | lily.RoutedMix us | speedup |")
    print("|---:|---:|---:|---:|")
    for N in (1, 16, 64, 4096):
        feeds = {"hidden": rng.standard_normal((N, R), dtype=np.float32)}
        check_agree(standard, custom, feeds, f"N={N}")
        t_std, t_custom = median_us(standard, feeds, budget, device), median_us(custom, feeds, budget, device)
        print(f"| {N} | {t_std:.1f} | {t_custom:.1f} | {t_std / t_custom:.2f}x |")
    if not device:
        decode_table(args.threads, budget, rng)


if __name__ == "__main__":
    main()
