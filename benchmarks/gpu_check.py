"""The one-shot GPU check: everything GPU-side that CPU tests cannot show, in one command, within a time budget.

Run: make gpu-check   (or: python benchmarks/gpu_check.py [--budget-s 480] [--only STAGE ...])
Without CUDA it prints one line and exits 0. On a GPU it runs these stages in order, each in a process of
its own with a timeout cut to the budget left, and rewrites docs/results/gpu_check.{json,md} after every
stage, so what finished is kept when time runs out or a stage fails:

  environment   device, versions (torch, CUDA, Transformer Engine, Triton, megatron-core), which optional
                fused paths run, the device's copy bandwidth measured here
  gpu_tests     the GPU-marked tests (pytest -m gpu): Triton rotary kernel vs the torch path (fp32/bf16,
                forward + backward), the Triton layer, the document mask on GPU
  te_vs_local   one small HARPE model built with megatron-core's local layers, saved, loaded into the
                Transformer Engine layer spec (megatron maps the names), logits compared in bf16 with plain
                and PoSE position ids; the TE model saved and loaded back (its _extra_state blobs pass the
                checkpoint vetting); skipped with its reason where TE does not import
  rotary        benchmarks/rotary_bandwidth.py at 4k, 16k, 64k, 128k: the Triton kernel's achieved bandwidth
                against the copy bandwidth measured in the same run
  layer_step    benchmarks/layer_step.py: one Llama-2-7B-shaped layer, forward + backward at 8k, 32k, 128k,
                stock RoPE vs HARPE vs PoSE ids: time and peak memory ratios (TE layers when TE imports)
  mfu           benchmarks/mfu_llama1b.py: MFU of the 1.1B proxy at 16k and 32k, stock RoPE vs HARPE

A stage's outcome is ok, failed (with the end of its output), skipped (with why) or out of time.
`--cpu-smoke` runs the plumbing on CPU at toy sizes (the test suite uses it); its results go elsewhere.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results"
TOLERANCE = 0.05  # te_vs_local: max |logit difference| over max |logit|, bf16 (layer norms and attention kernels differ)


# --- stages ----------------------------------------------------------------------------------

def stage_environment(args) -> dict:
    import torch

    from megatron_ext.compat.extras import fused_kernels_line, transformer_engine_available

    info = dict(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
                fused_paths=fused_kernels_line())
    for name in ("megatron.core", "transformer_engine", "triton"):
        try:
            module = __import__(name, fromlist=["__version__"])
            info[name] = getattr(module, "__version__", "installed")
        except Exception as error:  # noqa: BLE001 - recorded: what is missing is the finding
            info[name] = f"not importable ({type(error).__name__})"
    info["transformer_engine_usable"] = transformer_engine_available()
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        info.update(device=properties.name, memory_gib=round(properties.total_memory / 2**30, 1),
                    multiprocessors=properties.multi_processor_count, capability=list(torch.cuda.get_device_capability()))
        info["copy_bytes_per_s"] = copy_bandwidth(torch, 2**30)
    else:
        info.update(device="cpu", copy_bytes_per_s=copy_bandwidth(torch, 2**24))
    return info


def copy_bandwidth(torch, nbytes: int) -> float:
    """Bytes read + written per second by a device-to-device copy of nbytes (median of 10 after 3 warm-ups)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    source = torch.empty(nbytes, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    times = []
    for repeat in range(13):
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        target.copy_(source)
        if device == "cuda":
            torch.cuda.synchronize()
        if repeat >= 3:
            times.append(time.perf_counter() - started)
    return 2 * nbytes / sorted(times)[len(times) // 2]


def stage_gpu_tests(args) -> dict:
    command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests"]
    if args.cpu_smoke:
        command += ["--collect-only"]
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=args.stage_timeout)
    summary = (run.stdout.strip().splitlines() or [""])[-1]
    if run.returncode not in (0, 5):  # 5: nothing collected
        raise StageFailed(f"pytest exit {run.returncode}: {summary}", run.stdout[-4000:] + run.stderr[-2000:])
    return dict(command=" ".join(command[2:]), summary=summary)


def stage_te_vs_local(args) -> dict:
    """Local-spec HARPE model -> checkpoint -> TE-spec model: logits with plain and PoSE position ids."""
    import torch

    from megatron_ext.checkpoint.store import load_checkpoint, save_checkpoint
    from megatron_ext.compat.extras import transformer_engine_available
    from megatron_ext.config import TrainConfig
    from megatron_ext.distributed import single_process_group
    from megatron_ext.models import LongContextGPTModel
    from megatron_ext.models.builder import transformer_config
    from megatron_ext.models.specs import local_layer_spec, te_layer_spec
    from megatron_ext.rope import RopeConfig

    use_te = not args.cpu_smoke
    if use_te and not (torch.cuda.is_available() and transformer_engine_available()):
        raise StageSkipped("Transformer Engine does not import here (install it, e.g. the NGC PyTorch container)")
    device = torch.device("cuda" if use_te else "cpu")
    config = TrainConfig()
    m = config.model
    m.num_layers, m.hidden_size, m.num_attention_heads, m.num_query_groups = 4, 512, 8, 4
    m.seq_length = 256 if args.cpu_smoke else 4096
    config.training.precision = "bf16" if use_te else "fp32"
    config.rope = RopeConfig(head_base_strategy="uniform", head_base_params={"b_min": 1e4, "b_max": 5e6})
    vocab, length = 1024, m.seq_length
    positions = {"plain": torch.arange(length),
                 # PoSE: two chunks, the second moved by a skip so ids reach 8x the window
                 "pose": torch.cat([torch.arange(length // 2), torch.arange(length // 2) + 7 * length + length // 2])}
    tokens = torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(0)).to(device)

    with single_process_group(), tempfile.TemporaryDirectory() as scratch:
        torch.manual_seed(0)
        tc = transformer_config(config, device)
        local = LongContextGPTModel(tc, local_layer_spec(), vocab, length).to(device).eval()
        saved = save_checkpoint(Path(scratch) / "local", 0, model=[local], state={})
        other = LongContextGPTModel(tc, te_layer_spec() if use_te else local_layer_spec(), vocab, length).to(device)
        load_checkpoint(saved, model=[other.eval()], restore_rng=False)
        result = {}
        with torch.no_grad():
            for name, ids in positions.items():
                ids = ids.unsqueeze(0).to(device)
                a, b = (model(tokens, ids, None).float() for model in (local, other))
                difference = (a - b).abs().max().item()
                result[name] = dict(max_abs_difference=difference, max_abs_logit=a.abs().max().item(),
                                    relative=difference / a.abs().max().item())
        resaved = save_checkpoint(Path(scratch) / "te", 0, model=[other], state={})
        load_checkpoint(resaved, model=[other], restore_rng=False)  # the TE model's _extra_state passes vetting
    result["tolerance"] = TOLERANCE
    result["spec"] = "transformer_engine" if use_te else "local (cpu smoke)"
    result["passed"] = all(result[name]["relative"] <= TOLERANCE for name in positions)
    if not result["passed"]:
        raise StageFailed(f"TE vs local logits differ beyond {TOLERANCE:.0%} of the largest logit", json.dumps(result))
    return result


def benchmark_stage(script: str, gpu_options: list[str], cpu_options: list[str]):
    def stage(args) -> dict:
        with tempfile.TemporaryDirectory() as scratch:
            out = Path(scratch) / "result.json"
            command = [sys.executable, f"benchmarks/{script}", *(cpu_options if args.cpu_smoke else gpu_options),
                       "--out", str(out)]
            run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=args.stage_timeout)
            if run.returncode != 0 or not out.exists():
                raise StageFailed(f"{script} exit {run.returncode}", run.stdout[-3000:] + run.stderr[-3000:])
            return json.loads(out.read_text())
    return stage


STAGES = {
    "environment": (stage_environment, 60),
    "gpu_tests": (stage_gpu_tests, 120),
    "te_vs_local": (stage_te_vs_local, 90),
    "rotary": (benchmark_stage("rotary_bandwidth.py", ["--seq-lengths", "4096", "16384", "65536", "131072"],
                               ["--seq-lengths", "256", "512", "--dtypes", "fp32", "--heads", "4", "--kv-heads",
                                "4", "--head-dim", "32", "--repeats", "2"]), 120),
    "layer_step": (benchmark_stage("layer_step.py", ["--seq-lengths", "8192", "32768", "131072", "--repeats", "3"],
                                   ["--seq-lengths", "128", "--hidden", "64", "--heads", "4", "--groups", "2",
                                    "--ffn", "128", "--repeats", "1"]), 180),
    "mfu": (benchmark_stage("mfu_llama1b.py", ["--seq-lengths", "16384", "32768", "--repeats", "2"],
                            ["--seq-lengths", "128", "--repeats", "1"]), 180),
}


class StageFailed(Exception):
    def __init__(self, message: str, details: str = ""):
        super().__init__(message)
        self.details = details


class StageSkipped(Exception):
    pass


# --- running and reporting -------------------------------------------------------------------

def run_stage(name: str, args, deadline: float) -> dict:
    """Run one stage in a process of its own (a crash or a hung kernel costs that stage only)."""
    left = deadline - time.monotonic()
    needed = STAGES[name][1]
    if left < min(needed, 30):
        return dict(outcome="out of time", seconds=0.0, detail=f"{left:.0f} s left of the budget")
    timeout = max(10.0, min(needed * 2, left))
    command = [sys.executable, __file__, "--stage", name, "--stage-timeout", str(int(timeout))]
    if args.cpu_smoke:
        command.append("--cpu-smoke")
    started = time.monotonic()
    try:
        run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(outcome="out of time", seconds=round(time.monotonic() - started, 1),
                    detail=f"stopped after {timeout:.0f} s")
    seconds = round(time.monotonic() - started, 1)
    lines = run.stdout.strip().splitlines()
    if run.returncode != 0 or not lines:
        return dict(outcome="failed", seconds=seconds, detail=(run.stdout[-2000:] + run.stderr[-3000:]).strip())
    return dict(json.loads(lines[-1]), seconds=seconds)


def one_stage(name: str, args) -> None:
    """--stage NAME: run it here and print its outcome as the last line (JSON)."""
    try:
        outcome = dict(outcome="ok", result=STAGES[name][0](args))
    except StageSkipped as why:
        outcome = dict(outcome="skipped", detail=str(why))
    except StageFailed as failure:
        outcome = dict(outcome="failed", detail=f"{failure}\n{failure.details}"[-5000:])
    print(json.dumps(outcome, default=str))


def markdown(report: dict) -> str:
    lines = ["# GPU check", "", f"Command: `{report['command']}`  ", f"Started: {report['started']}; "
             f"budget {report['budget_s']} s, used {report['used_s']:.0f} s.", ""]
    environment = report["stages"].get("environment", {}).get("result", {})
    if environment:
        lines += ["| | |", "|---|---|"] + [f"| {key} | {value} |" for key, value in environment.items()] + [""]
    lines += ["| stage | outcome | seconds |", "|---|---|---|"]
    lines += [f"| {name} | {stage['outcome']} | {stage['seconds']} |" for name, stage in report["stages"].items()]
    for name, stage in report["stages"].items():
        if name == "environment":
            continue
        lines += ["", f"## {name}", ""]
        if stage["outcome"] != "ok":
            lines += ["```", stage.get("detail", "")[-3000:], "```"]
            continue
        result = stage["result"]
        rows = result.get("rows") if isinstance(result, dict) else None
        if rows:
            keys = list(rows[0])
            lines += [f"`{result.get('command', '')}`", "", "| " + " | ".join(keys) + " |",
                      "|" + "---|" * len(keys)]
            lines += ["| " + " | ".join(_cell(row.get(key)) for key in keys) + " |" for row in rows]
        else:
            lines += ["```json", json.dumps(result, indent=1, default=str), "```"]
    return "\n".join(lines) + "\n"


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-s", type=float, default=480.0, help="wall seconds for all stages (default 480)")
    parser.add_argument("--only", nargs="+", choices=list(STAGES), help="run these stages only")
    parser.add_argument("--cpu-smoke", action="store_true", help="the plumbing on CPU at toy sizes")
    parser.add_argument("--out-dir", default=None, help="where gpu_check.json/.md go (default docs/results; "
                        "with --cpu-smoke a temporary directory unless given)")
    parser.add_argument("--stage", choices=list(STAGES), help=argparse.SUPPRESS)
    parser.add_argument("--stage-timeout", type=float, default=300.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.stage:
        one_stage(args.stage, args)
        return 0

    import torch

    if not torch.cuda.is_available() and not args.cpu_smoke:
        print("gpu-check: needs a CUDA GPU (none found here); nothing run. The CPU checks are `make test`.")
        return 0
    out_dir = Path(args.out_dir) if args.out_dir else (Path(tempfile.mkdtemp()) if args.cpu_smoke else RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = dict(command="python benchmarks/gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                  started=time.strftime("%Y-%m-%dT%H:%M:%S%z"), budget_s=args.budget_s, used_s=0.0, stages={})
    began = time.monotonic()
    deadline = began + args.budget_s
    for name in args.only or list(STAGES):
        print(f"gpu-check: {name} ...", flush=True)
        report["stages"][name] = stage = run_stage(name, args, deadline)
        report["used_s"] = time.monotonic() - began
        print(f"gpu-check: {name}: {stage['outcome']} ({stage['seconds']} s)", flush=True)
        (out_dir / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
        (out_dir / "gpu_check.md").write_text(markdown(report))
    print(f"gpu-check: wrote {out_dir / 'gpu_check.md'} and gpu_check.json")
    return 0 if all(s["outcome"] in ("ok", "skipped") for s in report["stages"].values()) else 1


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
