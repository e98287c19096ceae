"""Real text for the real-model experiment: Python standard-library modules and English prose, split by file.

    python tools/real_model_data.py --out runs/real_model/text

Writes train.jsonl (both kinds), heldout_code.jsonl and heldout_prose.jsonl ({"text", "source", "name"} per line).
A file is held out when a hash of its name says so (one in five), so the split is the same on every machine
with the same Python. Prose: the long descriptions of the installed packages' METADATA (their READMEs) and the
Python reference text of pydoc_data. Needs no network.
"""

import argparse
import email
import hashlib
import importlib.metadata
import json
import random
import sysconfig
from pathlib import Path

HELD_OUT_ONE_IN = 5
MIN_CHARS = 2_000


def held_out(name: str) -> bool:
    return int(hashlib.sha256(name.encode()).hexdigest(), 16) % HELD_OUT_ONE_IN == 0


def stdlib_documents():
    """(name, text) of the standard library's modules, tests and vendored packages left out."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.glob("*.py")) + sorted(root.glob("*/*.py")):
        relative = path.relative_to(root).as_posix()
        if relative.startswith(("test", "idlelib", "lib2to3", "site-packages")) or "/test" in relative:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        if len(text) >= MIN_CHARS:
            yield f"stdlib/{relative}", text


def prose_documents():
    """(name, text) of English prose: installed packages' long descriptions (READMEs)."""
    seen = set()
    for dist in sorted(importlib.metadata.distributions(), key=lambda d: (d.metadata["Name"] or "").lower()):
        name = (dist.metadata["Name"] or "").lower()
        if not name or name in seen:
            continue
        seen.add(name)
        raw = dist.read_text("METADATA") or ""
        body = email.message_from_string(raw).get_payload() or ""
        if isinstance(body, str) and len(body) >= MIN_CHARS:
            yield f"readme/{name}", body.strip()


def write(out: Path) -> dict[str, int]:
    out.mkdir(parents=True, exist_ok=True)
    files = {kind: (out / f"{kind}.jsonl").open("w") for kind in ("train", "heldout_code", "heldout_prose")}
    counts = dict.fromkeys(files, 0)
    for source, documents in (("code", stdlib_documents()), ("prose", prose_documents())):
        for name, text in documents:
            kind = f"heldout_{source}" if held_out(name) else "train"
            files[kind].write(json.dumps({"text": text, "source": source, "name": name}) + "\n")
            counts[kind] += 1
    for handle in files.values():
        handle.close()
    return counts


def write_code_choice_task(text: Path, out: Path, *, items: int = 20, seed: int = 0) -> Path:
    """An lm-evaluation-harness task over held-out code: after 6 lines, the real next line or its words shuffled.

    Writes out/code_or_shuffled.{jsonl,yaml} (multiple choice, chance 0.5); `megatron-ext eval lm-eval --tasks out`.
    """
    rng = random.Random(seed)
    files = [json.loads(line)["text"].splitlines() for line in (text / "heldout_code.jsonl").open()]
    records = []
    while len(records) < items:
        lines = rng.choice(files)
        i = rng.randrange(6, len(lines))
        words = lines[i].split()
        shuffled = rng.sample(words, len(words))
        if len(words) < 4 or shuffled == words:
            continue
        indent = lines[i][:len(lines[i]) - len(lines[i].lstrip())]
        choices = [lines[i], indent + " ".join(shuffled)]
        rng.shuffle(choices)
        records.append({"context": "\n".join(lines[i - 6:i]) + "\n", "choices": choices,
                        "answer": choices.index(lines[i])})
    out.mkdir(parents=True, exist_ok=True)
    data = out / "code_or_shuffled.jsonl"
    data.write_text("".join(json.dumps(record) + "\n" for record in records))
    task = {"task": "code_or_shuffled", "dataset_path": "json", "test_split": "test",
            "dataset_kwargs": {"data_files": {"test": str(data.resolve())}}, "output_type": "multiple_choice",
            "doc_to_text": "{{context}}", "doc_to_choice": "{{choices}}", "doc_to_target": "{{answer}}",
            "target_delimiter": "", "metric_list": [{"metric": "acc"}]}
    (out / "code_or_shuffled.yaml").write_text(json.dumps(task, indent=1))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    print(json.dumps(write(args.out)))


if __name__ == "__main__":
    main()
