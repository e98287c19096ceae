"""`make real-model`: a real pretrained model through the whole chain, each step the command a user runs.

    python tools/real_model_chain.py [--out runs/real_model]

fetch SmolLM2-135M-Instruct (python -m megatron_ext.hf.real_model) -> `megatron-ext convert hf-to-mcore` -> real text
(tools/real_model_data.py) -> `megatron-ext preprocess` with the model's tokenizer -> `megatron-ext train` of
examples/configs/real_model_harpe_pose_cpu.yaml (HARPE, one base per KV group, + PoSE, document masks, 2 gloo
ranks), stopped after a few steps and resumed -> `megatron-ext convert mcore-to-hf` -> `megatron-ext eval perplexity`
of the original and of the export (transformers, through megatron_ext.hf) -> a before/after table; the export
also through `megatron-ext eval passkey` and `eval lm-eval` on a local task (held-out code: the next line or
its words shuffled).
About 7 minutes of CPU time (2 cores, fetch cached); every step prints what it runs and how long it took.
"""

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from real_model_data import write_code_choice_task  # noqa: E402
from real_model_experiment import ExperimentConfig, Results, megatron_ext, prepare  # noqa: E402

CONFIG = "examples/configs/real_model_harpe_pose_cpu.yaml"  # its paths are under runs/real_model
FIRST_RUN_ITERS = 4  # then resumed to the config's train_iters
EVAL_LENGTHS = (256, 1024)  # the training window and 4x it
EVAL_DOCUMENTS = 4


def evaluate(model: str, text: Path, out: Path) -> dict:
    megatron_ext("eval", "perplexity", "--model", model, "--data", str(text / "heldout_code.jsonl"),
                 str(text / "heldout_prose.jsonl"), "--lengths", *map(str, EVAL_LENGTHS), "--truncate",
                 "--num-documents", str(EVAL_DOCUMENTS), "--min-document-tokens", str(max(EVAL_LENGTHS)),
                 "--precision", "fp32", "--output-dir", str(out))
    return {str(row["length"]): row["perplexity"] for row in json.loads((out / "perplexity.json").read_text())["rows"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/real_model"))
    args = parser.parse_args()
    out = args.out
    started = time.time()
    results = Results(out / "chain.json")
    for step in [name for name in results.parts if name not in ("fetch", "convert", "text", "preprocess")]:
        results.parts.pop(step)  # the training and what follows run again each time; the preparation is kept
    paths = prepare(ExperimentConfig(output_dir=str(out)), results, out)
    run = out / "harpe_pose"
    shutil.rmtree(run, ignore_errors=True)
    results.run("train (first steps)", lambda: megatron_ext(
        "train", "--config", CONFIG, "--nproc-per-node", "2", "--set", f"training.train_iters={FIRST_RUN_ITERS}"))
    results.run("train (resumed)", lambda: megatron_ext("train", "--config", CONFIG, "--nproc-per-node", "2"))
    exported = run / "hf"
    results.run("export", lambda: megatron_ext("convert", "mcore-to-hf", "--ckpt", str(run / "checkpoints"),
                                               "--out", str(exported), "--no-progress"))
    text = Path(paths["text"])
    before = results.run("eval before", lambda: evaluate(paths["hf_dir"], text, out / "eval" / "before"))
    after = results.run("eval after", lambda: evaluate(str(exported), text, out / "eval" / "after"))
    tasks = write_code_choice_task(text, out / "lm_eval_tasks")
    results.run("eval passkey (export)", lambda: megatron_ext(
        "eval", "passkey", "--model", str(exported), "--lengths", "256", "512", "--trials", "5",
        "--precision", "fp32", "--output-dir", str(out / "eval" / "after")))
    results.run("eval lm-eval (export)", lambda: megatron_ext(
        "eval", "lm-eval", "--model", str(exported), "--tasks", str(tasks), "--batch-size", "4",
        "--output-dir", str(out / "eval" / "after_lm_eval")))
    print(f"\nheld-out perplexity, {EVAL_DOCUMENTS} documents, one window each (first tokens):")
    print("| length | SmolLM2-135M | after HARPE + PoSE |\n|---:|---:|---:|")
    for length in EVAL_LENGTHS:
        print(f"| {length} | {before[str(length)]:.3f} | {after[str(length)]:.3f} |")
    passkey = json.loads((out / "eval" / "after" / "passkey.json").read_text())["rows"]
    print("\nexport, passkey exact match: " + ", ".join(f"{row['accuracy']:.2f} at {row['length']}" for row in passkey))
    lm_eval = json.loads((out / "eval" / "after_lm_eval" / "lm_eval.json").read_text())["rows"]
    print("export, lm-eval: " + ", ".join(f"{row['task']} {row['metric']} {row['value']:.3f}" for row in lm_eval)
          + f" ({out / 'eval' / 'after_lm_eval'})")
    print(f"\nwall time {time.time() - started:.0f} s; results in {out / 'chain.json'}")


if __name__ == "__main__":
    main()
