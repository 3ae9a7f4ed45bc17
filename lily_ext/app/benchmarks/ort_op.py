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
    models = []
    for graph, opsets in (
        (custom, [helper.make_opsetid("", OPSET), helper.make_opsetid("lily", 1)]),
        (standard, [helper.make_opsetid("", OPSET)]),
    ):
        model = helper.make_model(graph, opset_imports=opsets, ir_version=IR_VERSION)
        onnx.checker.check_model(model)
        models.append(model.SerializeToString())
    return models


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
        options = {"intra_op_num_threads": args.threads}
        custom = lily_ext.ort_session(custom_bytes, **options)
        plain = ort.SessionOptions()
        plain.intra_op_num_threads = args.threads
        standard = ort.InferenceSession(standard_bytes, sess_options=plain, providers=["CPUExecutionProvider"])
        where = f"CPU EP, intra_op_num_threads={args.threads or 'default'}"
    print(f"onnxruntime {ort.__version__}, {where}, batch mode, r={R} E={E} out={OUT}; median us per run")
    print()
    print("| N | standard ONNX ops us | lily.RoutedMix us | speedup |")
    print("|---:|---:|---:|---:|")
    for N in (1, 16, 64, 4096):
        feeds = {"hidden": rng.standard_normal((N, R), dtype=np.float32)}
        a, b = standard.run(None, feeds)[0], custom.run(None, feeds)[0]
        err = np.abs(a - b).max() / max(np.abs(a).max(), 1e-30)
        assert err < 1e-4, f"the two graphs disagree at N={N}: relative error {err:.2e}"
        t_std, t_custom = median_us(standard, feeds, budget, device), median_us(custom, feeds, budget, device)
        print(f"| {N} | {t_std:.1f} | {t_custom:.1f} | {t_std / t_custom:.2f}x |")


if __name__ == "__main__":
    main()
