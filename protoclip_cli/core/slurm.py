"""A process started by SLURM's ``srun`` joins the run's process group without torchrun.

``srun`` starts one task per GPU and tells each where it stands: ``SLURM_PROCID`` (its rank),
``SLURM_NTASKS`` (the world size), ``SLURM_LOCALID`` (its index on its node, so its GPU) and
``SLURM_NODELIST`` (the job's hosts, compressed: ``node[01-04,07],gpu5``), as open_clip_train's
``distributed.py`` reads them. The rendezvous needs an address and a port every task computes
alike without talking to the others: the first host of the node list and a port derived from the
job id. :func:`launch_environment` turns these into torchrun's variables, so the rest of the
trainer sees one kind of launch; variables already in the environment win (torchrun started
inside a SLURM job, or an sbatch script that exports ``MASTER_ADDR``/``MASTER_PORT`` itself).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from protoclip_cli.errors import ProtoclipError

# torchrun's variables, which take precedence over SLURM's (rank, size, rendezvous).
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# Ports derived from job ids: 12000-31999, below Linux's ephemeral range (32768-60999) that
# outgoing connections take, so a derived port is rarely held by a client socket.
PORT_BASE = 12000
PORT_RANGE = 20000


def _split_top_level(text: str) -> list[str]:
    """Split at commas outside brackets: ``a[1,3],b`` -> ``['a[1,3]', 'b']``."""
    parts, depth, start = [], 0, 0
    for index, char in enumerate(text):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(text[start:index])
            start = index + 1
    parts.append(text[start:])
    return [part for part in parts if part]


def _expand_range(spec: str) -> list[str]:
    """``01-04,07`` -> ``['01', '02', '03', '04', '07']`` (zero padding kept as written)."""
    values = []
    for item in spec.split(","):
        low, _, high = item.partition("-")
        if not low.isdigit() or (high and not high.isdigit()):
            raise ValueError(item)
        for number in range(int(low), int(high or low) + 1):
            values.append(str(number).zfill(len(low)))
    return values


def _expand_host(pattern: str) -> list[str]:
    """One host pattern, any number of bracket groups: ``r[1-2]n[3,5]`` -> r1n3, r1n5, r2n3, r2n5."""
    match = re.search(r"\[([^\]]*)\]", pattern)
    if match is None:
        return [pattern]
    head, tail = pattern[: match.start()], pattern[match.end():]
    return [head + value + rest for value in _expand_range(match.group(1)) for rest in _expand_host(tail)]


def expand_nodelist(nodelist: str) -> list[str]:
    """Hosts of a SLURM node list in order (what ``scontrol show hostnames`` prints)."""
    try:
        hosts = [host for part in _split_top_level(nodelist.strip()) for host in _expand_host(part)]
    except ValueError:
        hosts = []
    if not hosts or any(not host or "[" in host or "]" in host for host in hosts):
        raise ProtoclipError(
            f"SLURM_NODELIST '{nodelist}' is not a node list (e.g. node[01-04,07],gpu5); launch with srun, "
            "or set MASTER_ADDR to the first node's address."
        )
    return hosts


def expand_tasks_per_node(spec: str) -> list[int]:
    """SLURM_TASKS_PER_NODE per node: ``8(x2),4`` -> [8, 8, 4]."""
    counts = []
    for part in spec.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if match is None:
            return []
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts


def rendezvous_port(job_id: str, step_id: str = "0") -> int:
    """The port every task of step ``step_id`` of job ``job_id`` listens on or connects to."""
    job = int(re.sub(r"\D", "", job_id) or 0)
    step = int(step_id) if step_id.isdigit() else 0
    return PORT_BASE + (job + step) % PORT_RANGE


def _local_world_size(environ: Mapping[str, str], world_size: int) -> int:
    if environ.get("SLURM_NTASKS_PER_NODE", "").isdigit():
        return int(environ["SLURM_NTASKS_PER_NODE"])
    per_node = expand_tasks_per_node(environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE", ""))
    node = int(environ.get("SLURM_NODEID", "0") or 0)
    if node < len(per_node):
        return per_node[node]
    return world_size


def launched_by_srun(environ: Mapping[str, str]) -> bool:
    """A task of a multi-task srun step: SLURM gave it a rank and a world of more than one."""
    return environ.get("SLURM_PROCID", "").isdigit() and int(environ.get("SLURM_NTASKS", "1") or 1) > 1


def launch_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """torchrun's variables for a task started by ``srun`` (none for any other process).

    Returns only variables ``environ`` lacks: where torchrun (or the user) set one, it wins.
    ``MASTER_PORT`` is :func:`rendezvous_port` of ``SLURM_JOB_ID`` (with ``SLURM_STEP_ID``, so two
    steps of one job on the same nodes do not collide).
    """
    if not launched_by_srun(environ):
        return {}
    world_size = int(environ["SLURM_NTASKS"])
    values = {
        "RANK": environ["SLURM_PROCID"],
        "WORLD_SIZE": str(world_size),
        "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
        "LOCAL_WORLD_SIZE": str(_local_world_size(environ, world_size)),
    }
    if "MASTER_ADDR" not in environ:
        nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
        if not nodelist:
            raise ProtoclipError(
                "srun started this task without SLURM_NODELIST; export MASTER_ADDR (the first node's address) "
                "in the sbatch script."
            )
        values["MASTER_ADDR"] = expand_nodelist(nodelist)[0]
    if "MASTER_PORT" not in environ:
        job = environ.get("SLURM_JOB_ID") or environ.get("SLURM_JOBID", "0")
        step = environ.get("SLURM_STEP_ID") or environ.get("SLURM_STEPID", "0")
        values["MASTER_PORT"] = str(rendezvous_port(job, step))
    return {name: value for name, value in values.items() if name not in environ}
