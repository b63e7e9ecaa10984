"""The parts of the prepared GPU check (`benchmarks/gpu_check.sh`) that are Python.

    python benchmarks/gpu_check.py agreement --json OUT.json   # engine (exits off) vs transformers' generate
    python benchmarks/gpu_check.py collect WORK --json OUT.json  # one results file from the steps' outputs

`agreement` decodes the same batch with the backbone's own `generate` and with the engine, exits
off, greedy, in float32 and in bfloat16 on the GPU, and counts identical tokens. Exits off, the
engine runs the same layers as the backbone, so float32 should agree on every token; bfloat16 may
part on near ties between logits, since the two paths may pick different fused kernels (reported,
not hidden). The model is BLIP-2 OPT at the OPT-1.3B shape with random weights, so no checkpoint
is needed.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time


OPT_1_3B = dict(num_layers=24, hidden_size=2048, num_heads=32, ffn_dim=8192, vocab_size=50272)


def agreement(device: str, batch: int, new_tokens: int, shape: dict = OPT_1_3B) -> list[dict]:
    import torch
    from PIL import Image

    from earlyexit.core.engine import EarlyExitForCausalLM
    from earlyexit.plugins.registry import get_registry

    rows = []
    cls = get_registry(load_entrypoints=False).backend("blip2-opt")
    for dtype in ("float32", "bfloat16"):
        torch.manual_seed(0)
        backend = cls.from_tiny_config(seed=0, **shape, init_std=0.02, image_size=32, num_query_tokens=32,
                                       vision_hidden=64).to(device, dtype)
        images = [Image.fromarray(torch.rand(32, 32, 3).mul(255).byte().numpy()) for _ in range(batch)]
        inputs = backend.prepare_inputs(images, ["a photo of"] * batch)
        settings = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        prompt = inputs["input_ids"].shape[1]
        with torch.no_grad():
            plain = backend.plain_generate(**inputs, **settings)[:, prompt:]
            engine = EarlyExitForCausalLM(backend).generate(**inputs, **settings)[:, prompt:]
        same = plain == engine
        # after the first difference the two continue from different prefixes: count the agreed prefix too
        prefix = same.long().cumprod(dim=1).sum(dim=1)
        rows.append({"dtype": dtype, "device": device, "batch": batch, "new_tokens": new_tokens,
                     "positions_identical": float(same.float().mean()),
                     "rows_identical": int(same.all(dim=1).sum()),
                     "mean_agreed_prefix": float(prefix.float().mean())})
        print(f"{dtype}: {rows[-1]['positions_identical']:.1%} of positions identical, "
              f"{rows[-1]['rows_identical']}/{batch} rows, agreed prefix {rows[-1]['mean_agreed_prefix']:.1f} tokens")
        del backend
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return rows


def collect(work: str) -> dict:
    """Every step's JSON and exit status under `work` (written by gpu_check.sh) in one dict."""
    steps = {}
    for path in sorted(glob.glob(os.path.join(work, "*.rc"))):
        name = os.path.basename(path)[:-3]
        with open(path) as handle:
            status = int(handle.read().strip() or 1)
        step = {"exit_status": status, "passed": status == 0}
        result = os.path.join(work, f"{name}.json")
        if os.path.exists(result):
            with open(result) as handle:
                step["result"] = json.load(handle)
        log = os.path.join(work, f"{name}.log")
        if os.path.exists(log):
            with open(log, errors="replace") as handle:
                step["log_tail"] = handle.read()[-4000:]
        seconds = os.path.join(work, f"{name}.seconds")
        if os.path.exists(seconds):
            with open(seconds) as handle:
                step["seconds"] = float(handle.read().strip())
        steps[name] = step
    return steps


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("agreement")
    check.add_argument("--device", default="cuda")
    check.add_argument("--batch-size", type=int, default=8)
    check.add_argument("--new-tokens", type=int, default=32)
    check.add_argument("--json", required=True)
    gather = sub.add_parser("collect")
    gather.add_argument("work")
    gather.add_argument("--json", required=True)
    gather.add_argument("--command", default="bash benchmarks/gpu_check.sh")
    args = parser.parse_args(argv)

    from earlyexit.util.files import write_json_atomically
    from earlyexit.util.provenance import provenance

    if args.command == "agreement":
        began = time.perf_counter()
        rows = agreement(args.device, args.batch_size, args.new_tokens)
        write_json_atomically(args.json, {"rows": rows, "seconds": time.perf_counter() - began})
        return 0
    import torch

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    write_json_atomically(args.json, {"command": args.command, "gpus": gpus, "steps": collect(args.work),
                                      "provenance": provenance()})
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
