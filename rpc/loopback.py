"""Local vs RPC benchmark of one artifact on one machine, through a loopback tracker.

    python -m tvm_lite.rpc.loopback [ARTIFACT] --target cuda --key cuda      # rpc/gpu_loopback.sh
    python -m tvm_lite.rpc.loopback ARTIFACT --target cuda --tune 2 --trials 64 --quant e0m4
    python -m tvm_lite.rpc.loopback --shape smollm2-135m --variant tvm_lite-e0m4 --target cuda

``--shape`` builds the artifact from a seeded random-weight model of that shape (fp16 export, as
``tvm_lite.bench.models`` makes them: what a GPU machine that cannot receive the real weights
runs), compiled as ``--variant`` says.

Starts a tracker and a server on 127.0.0.1, runs ``tvm-lite bench ARTIFACT --json`` locally and
``tvm-lite bench --rpc ... ARTIFACT --json`` through the tracker (each in its own process, so one
releases the device before the other loads), stops the processes, and prints both side by side
with their ratio: the RPC path adds the link's latency per step, nothing else, so the two should
agree within noise (decode steps pay one round trip more, which on loopback is well under a
millisecond). Exits non-zero if the two generate different greedy tokens.

``--tune N`` then tunes, through the same tracker and server, the ``N`` decode kernels of the
artifact's ONNX with the most FLOPs (MetaSchedule + XGBoost, ``--trials`` in all), 4-bit weights
as ``--quant`` says (the E0M4 decode GEMVs with ``--quant e0m4``; the lm_head is quantized too),
and prints each tuned kernel next to tvm_lite's hand schedule of it ("rules us").
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def _bench(args: list[str]) -> dict:
    cmd = [sys.executable, "-m", "tvm_lite.cli", "bench", *args, "--json"]
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if out.returncode:
        raise SystemExit(f"tvm-lite bench failed (exit {out.returncode})")
    return json.loads(out.stdout)


def compare(local: dict, remote: dict) -> list[dict]:
    rows = []
    for a, b in zip(local["rows"], remote["rows"]):
        rows.append({
            "prompt": a["prompt_len"],
            "prefill local": a["prefill_tok_s"], "prefill rpc": b["prefill_tok_s"],
            "prefill rpc/local": b["prefill_tok_s"] / a["prefill_tok_s"],
            "decode local": a["decode_tok_s"], "decode rpc": b["decode_tok_s"],
            "decode rpc/local": b["decode_tok_s"] / a["decode_tok_s"],
            "same tokens": a["tokens"] == b["tokens"],
        })
    return rows


def _tune(artifact, args, tracker: str, out: Path):
    """A tuning session for the artifact's model through ``tracker`` (see the module doc)."""
    from tvm_lite.artifact import load_manifest
    from tvm_lite.quant import QuantConfig

    from tvm_lite.tune import tune_model

    manifest = load_manifest(artifact)
    quant = None if args.quant == "none" else QuantConfig(
        format=args.quant, method="rtn", clip_search=False, include_lm_head=True)
    report = tune_model(manifest["onnx"], args.target, out / "tuned", tracker=tracker,
                        key=args.key, trials=args.trials, top=args.tune, quant=quant,
                        kv_cache=manifest.get("options", {}).get("kv_cache", "auto"),
                        progress=False, log=lambda m: print(m, file=sys.stderr, flush=True))
    (out / "tune.json").write_text(json.dumps(
        {"kernels": report.kernels, "trials": report.trials, "lost": report.lost,
         "stopped": report.stopped, "seconds": report.seconds}, indent=1, default=str))
    return report


def main(argv=None) -> int:
    from tvm_lite.bench import format_table

    from .processes import LocalCluster

    p = argparse.ArgumentParser(prog="python -m tvm_lite.rpc.loopback", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("artifact", nargs="?", default=None,
                   help="compiled artifact (default: compile the embedded model for --target)")
    p.add_argument("--shape", default=None, help="no ARTIFACT: build one from a random-weight "
                   "model of this shape (tvm_lite.bench.models.SHAPES)")
    p.add_argument("--variant", default="tvm_lite-e0m4",
                   help="--shape: tvm_lite-e0m4, tvm_lite-int4 or tvm_lite-fp16")
    p.add_argument("--target", default="cuda")
    p.add_argument("--key", default="loopback")
    p.add_argument("--device", default=None, help="default: the artifact's target kind")
    p.add_argument("--prompt-len", default="64,256,1024")
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--tracker-port", type=int, default=9190)
    p.add_argument("--out", default="rpc_loopback", help="folder for the JSON results and logs")
    p.add_argument("--tune", type=int, default=0, metavar="N",
                   help="also tune the N decode kernels with the most FLOPs over the tracker")
    p.add_argument("--trials", type=int, default=64, help="--tune: trial budget in all")
    p.add_argument("--quant", default="e0m4", choices=["none", "e0m4", "int4"],
                   help="--tune: the 4-bit format of the weights (RTN, lm_head included)")
    args = p.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    artifact = args.artifact
    if artifact is None and args.shape:
        from tvm_lite.bench.models import compile_variant, random_model
        from tvm_lite.export import export_onnx

        work = out / "models" / args.shape
        onnx_dir = export_onnx(random_model(args.shape, work / "hf"), work / "onnx",
                               dtype="float16")
        artifact = str(compile_variant(onnx_dir, args.variant, args.target))
    elif artifact is None:
        from tvm_lite.cli_common import resolve_artifact

        artifact = str(resolve_artifact(None, args.target))
    common = [artifact, "--prompt-len", args.prompt_len, "--decode-tokens",
              str(args.decode_tokens), "--repeats", str(args.repeats)]
    if args.device:
        common += ["--device", args.device]

    local = _bench(common)
    # A GPU runtime initialised in a process does not survive fork(): the CUDA run of this script
    # failed in the server's forked session ("cudaErrorInitializationError"), so GPU servers
    # start their sessions with spawn (TVM's --no-fork).
    gpu = not str(args.target).startswith(("llvm", "c "))
    report = None
    with LocalCluster(key=args.key, servers=1, tracker_port=args.tracker_port,
                      log_dir=out / "logs", no_fork=gpu) as cluster:
        remote = _bench([*common, "--rpc", cluster.address, "--key", args.key])
        if args.tune:
            report = _tune(artifact, args, cluster.address, out)
    rows = compare(local, remote)
    (out / "local.json").write_text(json.dumps(local, indent=1))
    (out / "rpc.json").write_text(json.dumps(remote, indent=1))
    (out / "compare.json").write_text(json.dumps(rows, indent=1))
    print(f"{artifact} ({local['target']}) on {local['device']}: local vs RPC over a loopback "
          f"tracker ({args.repeats} repeats, medians in tok/s)")
    print(format_table(rows, list(rows[0])))
    if report is not None:
        print(f"MetaSchedule over the tracker ({report.trials} trials, {report.seconds:.0f} s; "
              "tuned vs tvm_lite's own schedule of each kernel):")
        print(report.table())
    print(f"results in {out}/", file=sys.stderr)
    return 0 if all(r["same tokens"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
