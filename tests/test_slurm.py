"""SLURM's description of an srun task becomes torchrun's variables (core/slurm.py): the compressed
node lists, the port every task derives alike, and torchrun's own variables winning. The launch
itself (two srun-like processes training as the torchrun pair) is in test_train_ddp.py."""

from __future__ import annotations

import pytest

from protoclip_cli.core.slurm import (
    PORT_BASE,
    PORT_RANGE,
    expand_nodelist,
    expand_tasks_per_node,
    launch_environment,
    rendezvous_port,
)
from protoclip_cli.errors import ProtoclipError

TASK = {"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
        "SLURM_NODELIST": "node[01-02]", "SLURM_TASKS_PER_NODE": "8(x2)", "SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0"}


@pytest.mark.parametrize("nodelist, hosts", [
    ("gpu5", ["gpu5"]),
    ("node[01-04,07],gpu5", ["node01", "node02", "node03", "node04", "node07", "gpu5"]),
    ("a[8-11]", ["a8", "a9", "a10", "a11"]),
    ("rack[1-2]-n[03,5]", ["rack1-n03", "rack1-n5", "rack2-n03", "rack2-n5"]),
    ("x[009-010],y", ["x009", "x010", "y"]),
])
def test_node_lists_expand_as_scontrol_show_hostnames(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("nodelist", ["", "node[01-", "node[a-b]", "n[1-2]]"])
def test_a_malformed_node_list_is_one_sentence(nodelist):
    with pytest.raises(ProtoclipError, match="is not a node list"):
        expand_nodelist(nodelist)


def test_tasks_per_node_expand():
    assert expand_tasks_per_node("8(x2),4") == [8, 8, 4]
    assert expand_tasks_per_node("2") == [2]


def test_an_srun_task_gets_torchrun_variables():
    env = launch_environment(TASK)
    assert env == {"RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "8",
                   "MASTER_ADDR": "node01", "MASTER_PORT": str(rendezvous_port("4242", "0"))}


def test_every_task_of_a_step_derives_the_same_port_and_steps_differ():
    ports = {launch_environment({**TASK, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r % 8)})["MASTER_PORT"]
             for r in range(16)}
    assert len(ports) == 1
    port = int(ports.pop())
    assert PORT_BASE <= port < PORT_BASE + PORT_RANGE
    assert launch_environment({**TASK, "SLURM_STEP_ID": "1"})["MASTER_PORT"] != str(port)


def test_torchruns_variables_win_and_a_single_task_is_no_launch():
    torchrun = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "4",
                "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}
    assert launch_environment({**TASK, **torchrun}) == {}
    assert launch_environment({**TASK, "MASTER_ADDR": "10.0.0.1"})["RANK"] == "9"
    assert "MASTER_ADDR" not in launch_environment({**TASK, "MASTER_ADDR": "10.0.0.1"})
    assert launch_environment({**TASK, "SLURM_NTASKS": "1"}) == {}
    assert launch_environment({"SLURM_JOB_ID": "1"}) == {}
