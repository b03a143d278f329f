"""The launch/ scripts: syntax, DRY_RUN output and what actually runs (with fake launchers).

No training runs here: real launchers are never started. `DRY_RUN=1` prints the command;
the non-dry tests put fake `deepspeed` / `srun` / `torchrun` / `scontrol` first on PATH.
"""

from __future__ import annotations

import os
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
LAUNCH = ROOT / "launch"
SCRIPTS = ["single_node.sh", "multi_node.sh", "slurm.sbatch", "cpu.sh"]
OVERRIDES = ["trainer.lr=1e-5", "deepspeed=zero3"]
# Variables the scripts read: cleared so the caller's environment cannot change the results.
SCRIPT_VARS = {
    "DRY_RUN", "NUM_GPUS", "NUM_NODES", "NPROC", "LAUNCHER", "MASTER_ADDR", "MASTER_PORT",
    "HOSTFILE", "OUTPUT_DIR", "GPUS_PER_NODE", "OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES",
}  # fmt: skip


def script_env(extra: dict[str, str] | None = None, bin_dir: Path | None = None) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if k not in SCRIPT_VARS and not k.startswith("SLURM_")
    }
    path = [str(Path(sys.executable).parent), env.get("PATH", "/usr/bin:/bin")]
    if bin_dir is not None:
        path.insert(0, str(bin_dir))
    env["PATH"] = os.pathsep.join(path)
    env.update(extra or {})
    return env


def run(
    script: str,
    *args: str,
    env: dict[str, str] | None = None,
    bin_dir: Path | None = None,
    dry: bool = True,
    cwd: Path = ROOT,
) -> subprocess.CompletedProcess[str]:
    extra = {"DRY_RUN": "1"} if dry else {}
    extra.update(env or {})
    return subprocess.run(
        ["bash", str(LAUNCH / script), *args],
        env=script_env(extra, bin_dir),
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=30,
    )


def dry_argv(script: str, *args: str, **kwargs) -> list[str]:
    """The command a DRY_RUN prints, split as the shell would."""
    proc = run(script, *args, **kwargs)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("\n") == 1, proc.stdout  # exactly one line
    return shlex.split(proc.stdout)


def fake_bin(tmp_path: Path, **scripts: str) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text("#!/usr/bin/env bash\n" + body)
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return bin_dir


# A fake launcher: prints one shell-quoted line per call: two env vars, its name, its arguments.
RECORD_ARGS = (
    'printf \'%q \' "DS_ACCELERATOR=${DS_ACCELERATOR-}" "OMP_NUM_THREADS=${OMP_NUM_THREADS-}"'
    ' "$(basename "$0")" "$@"; echo\n'
)


def recorded(stdout: str) -> list[list[str]]:
    """One argv per fake launcher call: [DS_ACCELERATOR=.., OMP_NUM_THREADS=.., name, args...]."""
    return [shlex.split(line) for line in stdout.splitlines()]


# ---------------------------------------------------------------- all scripts


@pytest.mark.parametrize("script", SCRIPTS)
def test_bash_syntax_and_header(script: str) -> None:
    path = LAUNCH / script
    subprocess.run(["bash", "-n", str(path)], check=True)
    text = path.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text
    assert "DRY_RUN" in text.split("set -euo pipefail")[0]  # documented in the header


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_shellcheck() -> None:
    proc = subprocess.run(
        ["shellcheck", "-s", "bash", *(str(LAUNCH / s) for s in SCRIPTS)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hostfile_example_format() -> None:
    lines = [
        ln.split()
        for ln in (LAUNCH / "hostfile.example").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    assert lines and all(len(ln) == 2 and ln[1].startswith("slots=") for ln in lines)


# ---------------------------------------------------------------- single_node.sh


def test_single_node_dry_run() -> None:
    argv = dry_argv("single_node.sh", *OVERRIDES, env={"NUM_GPUS": "4", "MASTER_PORT": "29600"})
    assert argv == [
        "deepspeed", "--num_gpus", "4", "--master_port", "29600",
        "--module", "rmtrain.train", *OVERRIDES,
    ]  # fmt: skip


def test_single_node_counts_gpus_with_nvidia_smi(tmp_path: Path) -> None:
    bin_dir = fake_bin(
        tmp_path,
        **{"nvidia-smi": 'printf "GPU 0: H100 (UUID: a)\\n  MIG 1g (UUID: m)\\nGPU 1: H100\\n"\n'},
    )
    argv = dry_argv("single_node.sh", "x=1", bin_dir=bin_dir)
    assert argv[:5] == ["deepspeed", "--num_gpus", "2", "--master_port", "29500"]
    argv = dry_argv("single_node.sh", env={"CUDA_VISIBLE_DEVICES": "1,3"}, bin_dir=bin_dir)
    assert argv[:3] == ["deepspeed", "--include", "localhost:1,3"]


def test_single_node_quotes_overrides() -> None:
    odd = ["data.path=/tmp/my data", "run_name='a b'", "trainer.lr=$HOME"]
    argv = dry_argv("single_node.sh", *odd, env={"NUM_GPUS": "1"})
    assert argv[-3:] == odd


def test_single_node_rejects_bad_num_gpus() -> None:
    proc = run("single_node.sh", env={"NUM_GPUS": "two"})
    assert proc.returncode != 0 and "NUM_GPUS" in proc.stderr and proc.stdout == ""


def test_single_node_runs_what_it_prints(tmp_path: Path) -> None:
    bin_dir = fake_bin(tmp_path, deepspeed=RECORD_ARGS)
    env = {"NUM_GPUS": "3", "MASTER_PORT": "29601"}
    printed = dry_argv("single_node.sh", *OVERRIDES, "a=b c", env=env, bin_dir=bin_dir)
    proc = run("single_node.sh", *OVERRIDES, "a=b c", env=env, bin_dir=bin_dir, dry=False)
    assert proc.returncode == 0, proc.stderr
    assert [call[2:] for call in recorded(proc.stdout)] == [printed]


# ---------------------------------------------------------------- multi_node.sh


@pytest.fixture
def hostfile(tmp_path: Path) -> Path:
    path = tmp_path / "hosts"
    path.write_text("# test cluster\n\ngpu-a slots=8\n  # spare\ngpu-b slots=8\ngpu-c slots=4\n")
    return path


def test_multi_node_dry_run(hostfile: Path) -> None:
    argv = dry_argv("multi_node.sh", *OVERRIDES, env={"HOSTFILE": str(hostfile)})
    assert argv[:10] == [
        "deepspeed", "--hostfile", str(hostfile), "--num_nodes", "3",
        "--master_addr", "gpu-a", "--master_port", "29500", "--module",
    ]  # fmt: skip
    assert argv[10] == "rmtrain.train"
    assert argv[11].startswith("output_dir=outputs/multinode-")
    assert argv[12:] == OVERRIDES


def test_multi_node_env_and_explicit_output_dir(hostfile: Path) -> None:
    env = {
        "HOSTFILE": str(hostfile), "MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "29700",
        "NUM_NODES": "2", "NUM_GPUS": "4",
    }  # fmt: skip
    argv = dry_argv("multi_node.sh", "output_dir=/shared/run1", *OVERRIDES, env=env)
    assert argv == [
        "deepspeed", "--hostfile", str(hostfile), "--num_nodes", "2", "--num_gpus", "4",
        "--master_addr", "10.0.0.5", "--master_port", "29700",
        "--module", "rmtrain.train", "output_dir=/shared/run1", *OVERRIDES,
    ]  # fmt: skip


def test_multi_node_default_hostfile_from_any_cwd(tmp_path: Path) -> None:
    argv = dry_argv("multi_node.sh", cwd=tmp_path)
    assert argv[1:7] == [
        "--hostfile", str(LAUNCH / "hostfile.example"), "--num_nodes", "2",
        "--master_addr", "node1",
    ]  # fmt: skip


def test_multi_node_missing_hostfile(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-hostfile"
    proc = run("multi_node.sh", *OVERRIDES, env={"HOSTFILE": str(missing)})
    assert proc.returncode != 0
    assert proc.stdout == ""
    assert "hostfile not found" in proc.stderr and str(missing) in proc.stderr
    assert "HOSTFILE=" in proc.stderr  # says how to fix it


def test_multi_node_empty_hostfile(tmp_path: Path) -> None:
    empty = tmp_path / "hosts"
    empty.write_text("# nothing here\n\n")
    proc = run("multi_node.sh", env={"HOSTFILE": str(empty)})
    assert proc.returncode != 0 and "lists no hosts" in proc.stderr


# ---------------------------------------------------------------- slurm.sbatch

SLURM_ENV = {
    "SLURM_JOB_ID": "4242",
    "SLURM_JOB_NODELIST": "gpu[07-08]",
    "SLURM_NNODES": "2",
    "SLURM_GPUS_ON_NODE": "8",
    "SLURM_CPUS_PER_TASK": "32",
}
FAKE_SCONTROL = 'test "$1 $2 $3" = "show hostnames gpu[07-08]" && printf "gpu07\\ngpu08\\n"\n'


def split_srun(argv: list[str]) -> tuple[list[str], list[str], list[str]]:
    """srun argv -> (srun options, the per-node script split, the arguments given to it)."""
    i = argv.index("bash")
    assert argv[0] == "srun" and argv[i + 1] == "-c" and argv[i + 3] == "rmtrain-node"
    return argv[1:i], shlex.split(argv[i + 2]), argv[i + 4 :]


def test_slurm_sbatch_directives() -> None:
    text = (LAUNCH / "slurm.sbatch").read_text()
    for directive in ("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=8",
                      "--cpus-per-task=", "--job-name=rmtrain", "--output="):  # fmt: skip
        assert f"#SBATCH {directive}" in text


def test_slurm_dry_run(tmp_path: Path) -> None:
    bin_dir = fake_bin(tmp_path, scontrol=FAKE_SCONTROL)
    argv = dry_argv("slurm.sbatch", *OVERRIDES, env=SLURM_ENV, bin_dir=bin_dir)
    srun_opts, node_script, node_args = split_srun(argv)
    assert "--nodes=2" in srun_opts and "--ntasks-per-node=1" in srun_opts
    assert "--cpus-per-task=32" in srun_opts
    assert node_script == [
        "exec", "torchrun", "--nnodes", "2", "--nproc_per_node", "8",
        "--master_addr", "gpu07", "--master_port", "29500",
        "--node_rank", "$SLURM_NODEID", "-m", "rmtrain.train", "$@",
    ]  # fmt: skip
    assert node_args == ["output_dir=outputs/slurm-4242", *OVERRIDES, "trainer.resume=auto"]


def test_slurm_dry_run_outside_slurm() -> None:
    argv = dry_argv("slurm.sbatch", *OVERRIDES, env={"GPUS_PER_NODE": "2"})
    srun_opts, node_script, node_args = split_srun(argv)
    assert "--nodes=1" in srun_opts
    assert node_script[node_script.index("--master_addr") + 1] == "localhost"
    assert node_script[node_script.index("--nnodes") + 1] == "1"
    assert node_script[node_script.index("--nproc_per_node") + 1] == "2"
    assert node_args == ["output_dir=outputs/slurm-dryrun", *OVERRIDES, "trainer.resume=auto"]


@pytest.mark.skipif(shutil.which("scontrol") is not None, reason="real scontrol on PATH")
def test_slurm_first_host_without_scontrol() -> None:
    for nodelist, first in [("gpu[03-04,09],cpu1", "gpu03"), ("a1,a2", "a1"), ("n7", "n7")]:
        env = {**SLURM_ENV, "SLURM_JOB_NODELIST": nodelist}
        _, node_script, _ = split_srun(dry_argv("slurm.sbatch", env=env))
        assert node_script[node_script.index("--master_addr") + 1] == first


def test_slurm_deepspeed_launcher_dry_run(tmp_path: Path) -> None:
    bin_dir = fake_bin(tmp_path, scontrol=FAKE_SCONTROL)
    env = {**SLURM_ENV, "LAUNCHER": "deepspeed", "MASTER_PORT": "29800"}
    argv = dry_argv("slurm.sbatch", "output_dir=/shared/x", env=env, bin_dir=bin_dir)
    _, node_script, node_args = split_srun(argv)
    assert node_script[:2] == ["exec", "deepspeed"]
    for flag, value in [("--hostfile", "/shared/x/hostfile"), ("--num_nodes", "2"),
                        ("--num_gpus", "8"), ("--master_addr", "gpu07"),
                        ("--master_port", "29800"), ("--node_rank", "$SLURM_NODEID"),
                        ("--module", "rmtrain.train")]:  # fmt: skip
        assert node_script[node_script.index(flag) + 1] == value
    assert "--no_ssh" in node_script
    assert node_args == ["output_dir=/shared/x", "trainer.resume=auto"]  # the user's only
    assert not (tmp_path / "shared").exists()


def test_slurm_refuses_to_run_outside_slurm() -> None:
    proc = run("slurm.sbatch", dry=False)
    assert proc.returncode != 0 and "not inside a Slurm job" in proc.stderr


# Fake srun: run the command once per node with SLURM_NODEID set, like srun on N nodes.
FAKE_SRUN = """nodes=1
while [[ $1 == --* ]]; do [[ $1 == --nodes=* ]] && nodes=${1#--nodes=}; shift; done
for ((i = 0; i < nodes; i++)); do SLURM_NODEID=$i "$@" || exit; done
"""


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_slurm_runs_one_launcher_per_node(tmp_path: Path, launcher: str) -> None:
    bin_dir = fake_bin(
        tmp_path, scontrol=FAKE_SCONTROL, srun=FAKE_SRUN, torchrun=RECORD_ARGS,
        deepspeed=RECORD_ARGS,
    )  # fmt: skip
    out = tmp_path / "out"
    args = [f"output_dir={out}", "data.path=/tmp/my data"]
    env = {**SLURM_ENV, "LAUNCHER": launcher}
    proc = run("slurm.sbatch", *args, env=env, bin_dir=bin_dir, dry=False, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    calls = recorded(proc.stdout)
    assert len(calls) == 2  # one launcher per node
    for node_rank, call in enumerate(calls):
        argv = call[2:]
        assert argv[0] == launcher
        assert argv[argv.index("--node_rank") + 1] == str(node_rank)
        assert argv[argv.index("--master_addr") + 1] == "gpu07"
        assert argv[-4:] == ["rmtrain.train", *args, "trainer.resume=auto"]
    if launcher == "deepspeed":
        assert (out / "hostfile").read_text() == "gpu07 slots=8\ngpu08 slots=8\n"


# ---------------------------------------------------------------- cpu.sh


def test_cpu_dry_run_deepspeed_default() -> None:
    argv = dry_argv("cpu.sh", *OVERRIDES)
    assert argv[:6] == [
        "env", "DS_ACCELERATOR=cpu", "OMP_NUM_THREADS=1", "deepspeed", "--num_gpus", "2",
    ]  # fmt: skip
    assert argv[6] == "--master_port" and 1024 <= int(argv[7]) <= 65535  # a free port
    assert argv[8:] == ["--module", "rmtrain.train", *OVERRIDES]


def test_cpu_dry_run_torchrun() -> None:
    env = {"LAUNCHER": "torchrun", "NPROC": "3", "MASTER_PORT": "29555", "OMP_NUM_THREADS": "2"}
    argv = dry_argv("cpu.sh", *OVERRIDES, env=env)
    assert argv == [
        "env", "DS_ACCELERATOR=cpu", "OMP_NUM_THREADS=2", "torchrun", "--nproc_per_node", "3",
        "--master_port", "29555", "-m", "rmtrain.train", *OVERRIDES,
    ]  # fmt: skip


def test_cpu_rejects_unknown_launcher() -> None:
    proc = run("cpu.sh", env={"LAUNCHER": "mpirun", "MASTER_PORT": "1234"})
    assert proc.returncode != 0 and "LAUNCHER" in proc.stderr and proc.stdout == ""


@pytest.mark.parametrize("launcher", ["deepspeed", "torchrun"])
def test_cpu_runs_what_it_prints(tmp_path: Path, launcher: str) -> None:
    bin_dir = fake_bin(tmp_path, deepspeed=RECORD_ARGS, torchrun=RECORD_ARGS)
    env = {"LAUNCHER": launcher, "MASTER_PORT": "29556"}
    printed = dry_argv("cpu.sh", *OVERRIDES, env=env, bin_dir=bin_dir)
    proc = run("cpu.sh", *OVERRIDES, env=env, bin_dir=bin_dir, dry=False)
    assert proc.returncode == 0, proc.stderr
    # printed: env DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 <launcher> ...
    assert recorded(proc.stdout) == [printed[1:]]
