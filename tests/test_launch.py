"""Rank discovery from the launcher's variables (parallel/launch.py), with faked environments."""

import pytest

from megatron_ecdit.parallel.launch import LaunchError, discover, port_of_job


def srun_task(procid: int, nodes: int = 2, per_node: int = 4, **extra) -> dict:
    """What srun sets for task `procid` of `nodes` x `per_node` tasks (block distribution)."""
    return {"SLURM_JOB_ID": "123456", "SLURM_PROCID": str(procid),
            "SLURM_LOCALID": str(procid % per_node), "SLURM_NODEID": str(procid // per_node),
            "SLURM_NTASKS": str(nodes * per_node), "SLURM_STEP_NUM_TASKS": str(nodes * per_node),
            "SLURM_STEP_TASKS_PER_NODE": f"{per_node}(x{nodes})",
            "SLURM_STEP_NODELIST": "gpu[017-018]", "SLURM_JOB_NODELIST": "gpu[017-018]", **extra}


def test_two_nodes_of_four_tasks():
    seen = [discover(srun_task(p)) for p in range(8)]
    assert [s.rank for s in seen] == list(range(8))
    assert [s.local_rank for s in seen] == [0, 1, 2, 3] * 2
    assert {(s.world_size, s.local_world_size, s.master_addr, s.master_port) for s in seen} == {
        (8, 4, "gpu017", 20000 + 123456 % 20000)}
    assert all(s.launcher == "slurm" for s in seen)
    assert port_of_job("123456") == 23456


def test_master_port_from_the_environment_wins_and_is_exported():
    launch = discover(srun_task(5, MASTER_PORT="29999"))
    assert launch.master_port == 29999
    env = {}
    launch.export(env)
    assert env == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
                   "MASTER_ADDR": "gpu017", "MASTER_PORT": "29999"}


def test_uneven_tasks_per_node():
    launch = discover(srun_task(4, SLURM_STEP_TASKS_PER_NODE="4,2", SLURM_NODEID="1",
                                SLURM_LOCALID="0", SLURM_STEP_NUM_TASKS="6"))
    assert (launch.rank, launch.world_size, launch.local_world_size) == (4, 6, 2)


def test_torchrun_variables_win_over_slurm():
    env = {**srun_task(3), "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1",
           "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "node0", "MASTER_PORT": "1234"}
    launch = discover(env)
    assert (launch.launcher, launch.rank, launch.world_size, launch.master_addr) == (
        "torchrun", 1, 2, "node0")


def test_a_batch_shell_without_srun_is_one_process():
    env = srun_task(0)
    del env["SLURM_STEP_NUM_TASKS"]  # the batch script's own shell: no job step
    assert discover(env).world_size == 1 and discover(env).launcher == "single"


def test_devices_must_match_the_tasks_on_a_node():
    launch = discover(srun_task(6))
    assert launch.device_index(4) == 2  # one GPU per local rank
    assert launch.device_index(1) == 0  # one GPU bound to each task (--gpus-per-task=1)
    with pytest.raises(LaunchError, match="4 ranks run on this node but it shows 8 GPUs"):
        launch.device_index(8)


@pytest.mark.parametrize("change,message", [
    ({"SLURM_STEP_NODELIST": "gpu[017-"}, "cannot read the SLURM node list"),
    ({"SLURM_STEP_TASKS_PER_NODE": "four"}, "cannot read SLURM tasks per node"),
    ({"SLURM_LOCALID": "7"}, "do not fit 8 tasks"),
])
def test_inconsistent_slurm_variables_are_clear_errors(change, message):
    with pytest.raises(LaunchError, match=message):
        discover(srun_task(1, **change))
