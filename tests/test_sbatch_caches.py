"""The sbatch scripts give the container its caches: Hugging Face's (the datasets lm-eval reads) and Triton's,
in the submit directory by default, mounted when set elsewhere at submission; and a time limit."""

import subprocess
from pathlib import Path

from test_launch import ROOT, _fake_cluster

CACHES = ("HF_HOME", "HF_DATASETS_CACHE", "TRITON_CACHE_DIR")


def run_eval_job(tmp_path, **environment):
    env, log = _fake_cluster(tmp_path, 0)
    (tmp_path / "bin" / "srun").write_text(  # the task: log what it sees, then its command line
        '#!/bin/bash\necho "HF_HOME=$HF_HOME HF_DATASETS_CACHE=$HF_DATASETS_CACHE TRITON_CACHE_DIR=$TRITON_CACHE_DIR"'
        ' >> "$LOG"\necho "srun $*" >> "$LOG"\n')
    env = {k: v for k, v in env.items() if k not in CACHES} | environment
    submit = tmp_path / "submit"
    submit.mkdir()
    script = ROOT / "examples" / "slurm" / "eval.sbatch"
    result = subprocess.run(["bash", str(script), "lm-eval", "--model", "ckpt"], env=env, cwd=submit,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    seen, srun = log.read_text().splitlines()
    mounts = next(word for word in srun.split() if word.startswith("--container-mounts="))
    return submit, seen, mounts.removeprefix("--container-mounts=").split(",")


def test_caches_default_to_the_submit_directory_which_the_container_mounts(tmp_path):
    submit, seen, mounts = run_eval_job(tmp_path)
    hf = submit / ".cache" / "huggingface"
    assert seen == f"HF_HOME={hf} HF_DATASETS_CACHE={hf / 'datasets'} TRITON_CACHE_DIR={submit / '.cache' / 'triton'}"
    assert (hf / "datasets").is_dir() and (submit / ".cache" / "triton").is_dir()
    assert mounts[0] == f"{submit}:{submit}" and not any(".cache" in m for m in mounts)


def test_a_cache_set_elsewhere_at_submission_is_mounted_once(tmp_path):
    hf, triton = tmp_path / "shared" / "hf", tmp_path / "node" / "triton"
    submit, seen, mounts = run_eval_job(tmp_path, HF_HOME=str(hf), TRITON_CACHE_DIR=str(triton))
    assert seen == f"HF_HOME={hf} HF_DATASETS_CACHE={hf / 'datasets'} TRITON_CACHE_DIR={triton}"
    assert mounts[:3] == [f"{submit}:{submit}", f"{hf}:{hf}", f"{triton}:{triton}"]  # datasets: inside HF_HOME
    assert Path(hf / "datasets").is_dir()


def test_every_job_kind_has_a_time_limit():
    for script in (ROOT / "examples" / "slurm").glob("*.sbatch"):
        assert "#SBATCH --time=04:00:00" in script.read_text().splitlines(), script.name


def test_validation_data_outside_the_submit_directory_is_mounted(tmp_path, capsys):
    from megatron_ext.cli import main

    assert main(["launch", "--config", str(ROOT / "examples" / "configs" / "llama2_7b_harpe_128k.yaml"), "--nodes",
                 "8", "--set", "training.eval_interval=100", "--set", "data.valid_data=[/valid/held_out_text_document]",
                 "--output", str(tmp_path / "job.sbatch")]) == 0
    mounts = next(line for line in (tmp_path / "job.sbatch").read_text().splitlines()
                  if line.startswith("CONTAINER_MOUNTS="))
    assert "/valid:/valid" in mounts
