"""Local vs RPC benchmark of one artifact on one machine, through a loopback tracker.

    python -m tvm_lite.rpc.loopback [ARTIFACT] --target cuda --key cuda      # rpc/gpu_loopback.sh

Starts a tracker and a server on 127.0.0.1, runs ``tvm-lite bench ARTIFACT --json`` locally and
``tvm-lite bench --rpc ... ARTIFACT --json`` through the tracker (each in its own process, so one
releases the device before the other loads), stops the processes, and prints both side by side
with their ratio: the RPC path adds the link's latency per step, nothing else, so the two should
agree within noise (decode steps pay one round trip more, which on loopback is well under a
millisecond). Exits non-zero if the two generate different greedy tokens.
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


def main(argv=None) -> int:
    from tvm_lite.bench import format_table

    from .processes import LocalCluster

    p = argparse.ArgumentParser(prog="python -m tvm_lite.rpc.loopback", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("artifact", nargs="?", default=None,
                   help="compiled artifact (default: compile the embedded model for --target)")
    p.add_argument("--target", default="cuda")
    p.add_argument("--key", default="loopback")
    p.add_argument("--device", default=None, help="default: the artifact's target kind")
    p.add_argument("--prompt-len", default="64,256,1024")
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--tracker-port", type=int, default=9190)
    p.add_argument("--out", default="rpc_loopback", help="folder for the JSON results and logs")
    args = p.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    artifact = args.artifact
    if artifact is None:
        from tvm_lite.cli import resolve_artifact

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
    with LocalCluster(key=args.key, servers=1, tracker_port=args.tracker_port,
                      log_dir=out / "logs", no_fork=gpu) as cluster:
        remote = _bench([*common, "--rpc", cluster.address, "--key", args.key])
    rows = compare(local, remote)
    (out / "local.json").write_text(json.dumps(local, indent=1))
    (out / "rpc.json").write_text(json.dumps(remote, indent=1))
    (out / "compare.json").write_text(json.dumps(rows, indent=1))
    print(f"{artifact} ({local['target']}) on {local['device']}: local vs RPC over a loopback "
          f"tracker ({args.repeats} repeats, medians in tok/s)")
    print(format_table(rows, list(rows[0])))
    print(f"results in {out}/", file=sys.stderr)
    return 0 if all(r["same tokens"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
